//! Criterion benches of the store's hot metadata paths: the slab allocator, LRU operations of
//! the host index, and `lookup_prefix`.
#![expect(
    missing_docs,
    reason = "criterion_group! generates an undocumented public function"
)]

use criterion::{BatchSize, Criterion, black_box, criterion_group, criterion_main};
use kvstore::alloc::{SizeClasses, SlabAllocator};
use kvstore::{BlockHash, BlockKey, HostTierConfig, HugePages, Namespace, StoreConfig, TieredStore};

fn keys(n: u64) -> Vec<BlockKey> {
    let ns = Namespace::builder("bench").build();
    (0..n)
        .map(|i| BlockKey::new(ns, BlockHash::from_u64(i)))
        .collect()
}

fn allocator(c: &mut Criterion) {
    c.bench_function("alloc/free 64KiB (slab 64MiB)", |b| {
        let mut a = SlabAllocator::new(SizeClasses::Geometric, 64 << 20, 64);
        while a.add_slab().is_some() {}
        let held: Vec<_> = (0..30_000).map(|_| a.alloc(65536).expect("space")).collect();
        let mut i = 0;
        b.iter(|| {
            let s = a.alloc(black_box(65536)).expect("space");
            a.free(s);
            i += 1;
        });
        black_box(held);
    });
    c.bench_function("alloc mixed sizes until full", |b| {
        b.iter_batched(
            || {
                let mut a = SlabAllocator::new(SizeClasses::Geometric, 4 << 20, 64);
                while a.add_slab().is_some() {}
                a
            },
            |mut a| {
                let sizes = [16 << 10, 64 << 10, 256 << 10, 1 << 20];
                let mut n = 0usize;
                while a.alloc(sizes[n % 4]).is_some() {
                    n += 1;
                }
                n
            },
            BatchSize::SmallInput,
        );
    });
}

fn lru(c: &mut Criterion) {
    let ks = keys(100_000);
    c.bench_function("lru get+put 100k entries", |b| {
        let mut l = lru::LruCache::unbounded();
        for k in &ks {
            l.put(*k, 0u64);
        }
        let mut i = 0usize;
        b.iter(|| {
            let k = &ks[(i * 7919) % ks.len()];
            black_box(l.get(k));
            l.put(*k, i as u64);
            i += 1;
        });
    });
}

fn lookup_prefix(c: &mut Criterion) {
    let store = TieredStore::open(StoreConfig {
        host: HostTierConfig {
            huge_pages: HugePages::Off,
            ..HostTierConfig::new(64 << 20)
        },
        disk: None,
        object: None,
    })
    .expect("store");
    let ks = keys(512);
    let block = vec![1u8; 4096];
    for k in &ks {
        store.put(k, &block);
    }
    c.bench_function("lookup_prefix 256 keys (host hits)", |b| {
        b.iter(|| black_box(store.lookup_prefix(black_box(&ks[..256]))))
    });
    let missing = keys(1024);
    c.bench_function("lookup_prefix 512 keys, gap at 256", |b| {
        let mut probe: Vec<_> = ks[..256].to_vec();
        probe.extend_from_slice(&missing[600..856]);
        b.iter(|| black_box(store.lookup_prefix(black_box(&probe))))
    });
}

criterion_group!(benches, allocator, lru, lookup_prefix);
criterion_main!(benches);
