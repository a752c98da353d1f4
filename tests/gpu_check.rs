//! The GPU check's store -> retrieve -> SIGKILL -> restart path on one GPU
//! with two TP worker processes (`kvcoord-harness gpu-check`), verified byte
//! for byte. A test of the harness package, so cargo builds its binary.
//!
//! Without a CUDA driver (CI) it prints "skipped: no CUDA driver" and passes.

use kvcoord_memory::cuda::{driver_present, CudaDevice};

fn cuda_available() -> bool {
    if !driver_present() || CudaDevice::all().map(|d| d.is_empty()).unwrap_or(true) {
        eprintln!("skipped: no CUDA driver");
        return false;
    }
    true
}

#[test]
fn two_gpu_workers_store_retrieve_and_survive_a_coordinator_restart_byte_exact() {
    if !cuda_available() {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcoord-harness"))
        .args(["gpu-check", "--procs", "2", "--chunks", "4", "--rounds", "1", "--dma-bytes", "67108864"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("gpu-check: PASS"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
