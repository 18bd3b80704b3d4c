//! Criterion bench: loading real ONNX models with qgraph (parse, decode weights, resolve names,
//! sort) — all_minilm_l6_v2 (90 MB) and mobilenetv2_keras (14 MB) from `../shared/zoo`.
//! Skipped with a note when the zoo is not beside the project.

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};

fn load(c: &mut Criterion) {
    let zoo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/zoo/models");
    let mut group = c.benchmark_group("load");
    group.sample_size(20);
    for name in ["all_minilm_l6_v2", "mobilenetv2_keras"] {
        let path = zoo.join(format!("{name}.onnx"));
        if !path.exists() {
            eprintln!("skipping {name}: {} not found", path.display());
            continue;
        }
        group.bench_function(name, |b| b.iter(|| qgraph::load_path(&path).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, load);
criterion_main!(benches);
