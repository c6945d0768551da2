//! Compiles proto/ (our own copies of the three protocols) into one descriptor set, embedded in
//! the binary. Pure Rust (protox): no protoc needed.

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let files = [
        "seldon/prediction.proto",
        "tensorflow_serving/apis/prediction_service.proto",
        "inference/grpc_predict_v2.proto",
    ];
    let set = protox::Compiler::new([&root])
        .expect("proto root")
        .include_imports(true)
        .open_files(files)
        .unwrap_or_else(|e| panic!("compiling proto/: {e}"))
        .encode_file_descriptor_set();
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("descriptors.bin");
    std::fs::write(out, set).expect("write descriptor set");
}
