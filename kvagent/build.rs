//! Compiles the index's and the peers' gRPC protocols with protox (no system `protoc` needed) and generates the
//! tonic server and client, plus the descriptor set served by gRPC reflection.

use std::path::PathBuf;

use protox::prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/kvtier/index/v1/index.proto",
        "proto/kvtier/peer/v1/peer.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds_path = out.join("kvtier_index_descriptor.bin");
    std::fs::write(&fds_path, fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .skip_protoc_run()
        .file_descriptor_set_path(&fds_path)
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
