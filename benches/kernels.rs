//! Criterion bench: the qkernels kernels that run on every activation of a simulated forward
//! pass — fake-quant per tensor (int8, int16) and per channel (int8), the fp16 fake-cast, running
//! min/max and the TF-enhanced histogram — on a 4 KiB (L1), 1 MiB (L2) and 64 MiB (DRAM) buffer,
//! each next to a `copy_from_slice` of the same size (the memory-speed yardstick).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use qkernels::{Encoding, MinMax, QuantSpec, Rounding, TfHistogram};

fn data(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919) % 4001) as f32 / 1000.0 - 2.0).collect()
}

fn kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("qkernels");
    let int8 = Encoding::from_range(-2.0, 2.0, QuantSpec::asymmetric(8)).unwrap();
    let int16 = Encoding::from_range(-2.0, 2.0, QuantSpec::asymmetric(16)).unwrap();
    for (label, bytes) in [("4KiB", 4usize << 10), ("1MiB", 1 << 20), ("64MiB", 64 << 20)] {
        let len = bytes / 4;
        let src = data(len);
        let mut buf = src.clone();
        group.throughput(Throughput::Bytes(bytes as u64));
        group.sample_size(if bytes > 1 << 20 { 10 } else { 50 });
        group.bench_function(BenchmarkId::new("memcpy", label), |b| b.iter(|| buf.copy_from_slice(&src)));
        group.bench_function(BenchmarkId::new("fake_quant_int8", label), |b| {
            b.iter(|| qkernels::fake_quant(&mut buf, &int8))
        });
        group.bench_function(BenchmarkId::new("fake_quant_int16", label), |b| {
            b.iter(|| qkernels::fake_quant(&mut buf, &int16))
        });
        let channels = 64;
        let per_channel = vec![int8; channels];
        let shape = [channels, len / channels];
        group.bench_function(BenchmarkId::new("fake_quant_int8_per_channel", label), |b| {
            b.iter(|| {
                qkernels::fake_quant_per_channel(
                    &mut buf,
                    &shape,
                    0,
                    &per_channel,
                    Rounding::HalfAwayFromZero,
                )
            })
        });
        group.bench_function(BenchmarkId::new("fake_cast_f16", label), |b| {
            b.iter(|| qkernels::fake_cast_f16(&mut buf))
        });
        group.bench_function(BenchmarkId::new("min_max", label), |b| {
            b.iter(|| {
                let mut m = MinMax::default();
                m.observe(&src);
                m
            })
        });
        group.bench_function(BenchmarkId::new("tf_histogram", label), |b| {
            let mut h = TfHistogram::new();
            b.iter(|| h.observe(&src))
        });
    }
    group.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
