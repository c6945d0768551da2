//! Decode and transcode cost per payload size: `cargo bench -p codec`.
//! Sizes: a 2-value request, 1 Ki floats, a cifar10 image (3072 floats), 64 Ki floats.

use bytes::Bytes;
use codec::{Hints, Pool, Protocol, Transcoder, detect};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde_json::json;
use std::hint::black_box;

fn v2_json(n: usize) -> Bytes {
    let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.37).collect();
    Bytes::from(json!({"id": "r1", "inputs": [{"name": "x", "shape": [n], "datatype": "FP32", "data": data}]}).to_string())
}

fn benches(c: &mut Criterion) {
    let pool = Pool::builtin();
    let t = Transcoder::new(pool.clone());
    let h = Hints {
        model_name: Some("m".into()),
        tf_input_name: Some("input_1".into()),
        tf_row_format: true,
        ..Default::default()
    };
    let proto_hdr = vec![(
        "proto-name".to_string(),
        Bytes::from_static(b"inference.ModelInferRequest"),
    )];
    for n in [2usize, 1024, 3072, 65536] {
        let js = v2_json(n);
        let pb = t
            .json_to_proto(Protocol::V2, "inference.ModelInferRequest", &js, &h)
            .unwrap();
        let mut g = c.benchmark_group(format!("n={n}"));
        g.bench_with_input(BenchmarkId::new("detect_json", js.len()), &js, |b, js| {
            b.iter(|| detect(&pool, black_box(js.clone()), &[]).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("detect_proto", pb.len()), &pb, |b, pb| {
            b.iter(|| detect(&pool, black_box(pb.clone()), &proto_hdr).unwrap())
        });
        g.bench_function("v2_json_to_proto", |b| {
            b.iter(|| {
                t.json_to_proto(
                    Protocol::V2,
                    "inference.ModelInferRequest",
                    black_box(&js),
                    &h,
                )
                .unwrap()
            })
        });
        g.bench_function("v2_proto_to_json", |b| {
            b.iter(|| {
                t.proto_to_json(
                    Protocol::V2,
                    "inference.ModelInferRequest",
                    black_box(&pb),
                    &h,
                )
                .unwrap()
            })
        });
        if n == 3072 {
            let img: Vec<Vec<Vec<f32>>> = (0..32)
                .map(|r| {
                    (0..32)
                        .map(|c| {
                            (0..3)
                                .map(|k| ((r * 96 + c * 3 + k) % 255) as f32 / 255.0)
                                .collect()
                        })
                        .collect()
                })
                .collect();
            let tf = Bytes::from(json!({"instances": [img]}).to_string());
            g.bench_function("tf_cifar_json_to_proto", |b| {
                b.iter(|| {
                    t.json_to_proto(
                        Protocol::Tensorflow,
                        "tensorflow.serving.PredictRequest",
                        black_box(&tf),
                        &h,
                    )
                    .unwrap()
                })
            });
        }
        g.finish();
    }
}

criterion_group!(name = codec_benches; config = Criterion::default().sample_size(20); targets = benches);
criterion_main!(codec_benches);
