//! Generates the labgrid coordinator client (`rig/proto/labgrid-coordinator.proto`)
//! with tonic, parsing the proto with protox (pure Rust: no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/labgrid-coordinator.proto");
    let fds = protox::compile(["labgrid-coordinator.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
