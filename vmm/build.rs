//! Assembles the built-in guest programs from `guest/*.S` with the system's GNU assembler and
//! flattens them to raw binaries with objcopy (both from binutils, present wherever gcc is).
//! No prebuilt blobs are committed. In order: `pc-boot` includes the flat `memtouch`.

use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["memtouch", "pc-boot"];

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run {:?} (binutils installed?): {e}",
            cmd.get_program()
        )
    });
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in PROGRAMS {
        let src = format!("guest/{name}.S");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let bin = out.join(format!("{name}.bin"));
        run(Command::new("as")
            .args(["--64", "-I"])
            .arg(&out)
            .arg("-o")
            .arg(&obj)
            .arg(&src));
        run(Command::new("objcopy")
            .args(["-O", "binary", "--only-section=.text"])
            .arg(&obj)
            .arg(&bin));
    }
}
