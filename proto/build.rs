//! Generates the Rust protobuf messages and the async ttrpc client/server
//! code for `agent.proto`, and the messages of `cri_pod.proto`, into
//! `$OUT_DIR` with pure-Rust parsers (no `protoc` needed).

use std::{env, fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let proto = manifest_dir.join("agent.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    println!("cargo:rerun-if-changed=build.rs");

    Codegen::new()
        .out_dir(&out_dir)
        .include(&manifest_dir)
        .input(&proto)
        .rust_protobuf()
        .rust_protobuf_customize(
            ProtobufCustomize::default()
                .gen_mod_rs(false)
                .generate_accessors(true),
        )
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("ttrpc-codegen failed for agent.proto");

    // The CRI pod config subset (messages only) that CreateSandbox carries.
    let cri = manifest_dir.join("cri_pod.proto");
    println!("cargo:rerun-if-changed={}", cri.display());
    protobuf_codegen::Codegen::new()
        .pure()
        .out_dir(&out_dir)
        .include(&manifest_dir)
        .input(&cri)
        .customize(protobuf_codegen::Customize::default().gen_mod_rs(false))
        .run()
        .expect("protobuf codegen failed for cri_pod.proto");

    // `include!` cannot take files with inner attributes or inner doc
    // comments (rust-lang/rust#18810): drop those lines.
    for name in ["agent.rs", "agent_ttrpc.rs", "cri_pod.rs"] {
        let path = out_dir.join(name);
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading generated {}: {e}", path.display()));
        let cleaned: String = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .flat_map(|l| [l, "\n"])
            .collect();
        fs::write(&path, cleaned).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}
