// Batched copy kernel for kvtier's CUDA copy engine. `ptx.py` compiles this file into
// `copy_pieces.ptx`, which the engine loads at run time (the driver JIT-compiles it for the GPU
// it runs on), so building kvtier needs no CUDA toolkit.
//
// Every piece is one contiguous copy between device memory and the host arena (registered,
// device-mapped), at most a few tens of KiB (the engine splits longer ones). One launch covers a
// whole batch, and each warp takes pieces in turn: vLLM's pages are small (1-64 KiB), and a
// piece per thread block would leave most of its threads idle on them while each piece waits a
// PCIe round trip. A warp's lanes copy 16-byte words, four loads in flight per lane before the
// stores, and the next piece's descriptor (in mapped host memory) is fetched before the current
// piece is copied. Pieces not aligned to 16 bytes fall back to byte copies (correct, slow;
// vLLM's pages are always aligned).

struct Piece {
    unsigned long long src;
    unsigned long long dst;
    unsigned long long len;
};

__device__ __forceinline__ void copy_piece(const Piece& p, unsigned int lane) {
    if (((p.src | p.dst | p.len) & 15ull) == 0) {
        const uint4* __restrict__ s = reinterpret_cast<const uint4*>(p.src);
        uint4* __restrict__ d = reinterpret_cast<uint4*>(p.dst);
        const unsigned long long words = p.len >> 4;
        unsigned long long w = lane;
        for (; w + 96 < words; w += 128) {
            const uint4 a = s[w];
            const uint4 b = s[w + 32];
            const uint4 c = s[w + 64];
            const uint4 e = s[w + 96];
            d[w] = a;
            d[w + 32] = b;
            d[w + 64] = c;
            d[w + 96] = e;
        }
        for (; w < words; w += 32) {
            d[w] = s[w];
        }
    } else {
        const unsigned char* __restrict__ s = reinterpret_cast<const unsigned char*>(p.src);
        unsigned char* __restrict__ d = reinterpret_cast<unsigned char*>(p.dst);
        for (unsigned long long b = lane; b < p.len; b += 32) {
            d[b] = s[b];
        }
    }
}

extern "C" __global__ void kvtier_copy_pieces(const Piece* __restrict__ pieces, unsigned int count) {
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warps = (gridDim.x * blockDim.x) >> 5;
    unsigned int i = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (i >= count) {
        return;
    }
    Piece next = pieces[i];
    while (i < count) {
        const Piece p = next;
        const unsigned int j = i + warps;
        if (j < count) {
            next = pieces[j];
        }
        copy_piece(p, lane);
        i = j;
    }
}
