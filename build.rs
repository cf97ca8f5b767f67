// Compiles proto/satstream/v1/*.proto (tonic/prost) and writes the descriptor set that server
// reflection serves, so grpcurl works with no .proto at hand.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        "proto/satstream/v1/inference.proto",
        "proto/satstream/v1/admin.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("satstream_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
