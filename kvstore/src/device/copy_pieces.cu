// Batched copy kernel for kvtier's CUDA copy engine. `ptx.py` compiles this file into
// `copy_pieces.ptx`, which the engine loads at run time (the driver JIT-compiles it for the GPU
// it runs on), so building kvtier needs no CUDA toolkit.
//
// Every piece is one contiguous copy between device memory and the host arena (registered,
// device-mapped). One launch covers a whole batch: each thread block takes pieces in turn, and
// its threads copy 16-byte words, four loads in flight per thread before the stores, so that a
// few blocks keep enough PCIe requests outstanding. Pieces not aligned to 16 bytes fall back to
// byte copies (correct, slow; vLLM's pages are always aligned).

struct Piece {
    unsigned long long src;
    unsigned long long dst;
    unsigned long long len;
};

extern "C" __global__ void kvtier_copy_pieces(const Piece* __restrict__ pieces, unsigned int count) {
    for (unsigned int i = blockIdx.x; i < count; i += gridDim.x) {
        const Piece p = pieces[i];
        const unsigned long long step = blockDim.x;
        if (((p.src | p.dst | p.len) & 15ull) == 0) {
            const uint4* __restrict__ s = reinterpret_cast<const uint4*>(p.src);
            uint4* __restrict__ d = reinterpret_cast<uint4*>(p.dst);
            const unsigned long long words = p.len >> 4;
            unsigned long long w = threadIdx.x;
            for (; w + 3 * step < words; w += 4 * step) {
                const uint4 a = s[w];
                const uint4 b = s[w + step];
                const uint4 c = s[w + 2 * step];
                const uint4 e = s[w + 3 * step];
                d[w] = a;
                d[w + step] = b;
                d[w + 2 * step] = c;
                d[w + 3 * step] = e;
            }
            for (; w < words; w += step) {
                d[w] = s[w];
            }
        } else {
            const unsigned char* __restrict__ s = reinterpret_cast<const unsigned char*>(p.src);
            unsigned char* __restrict__ d = reinterpret_cast<unsigned char*>(p.dst);
            for (unsigned long long b = threadIdx.x; b < p.len; b += step) {
                d[b] = s[b];
            }
        }
    }
}
