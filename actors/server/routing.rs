//! Which copy lane a registration's copies go to: the lane (GPU worker) of
//! the device whose UUID the IPC handles name (never an ordinal: ordinals differ between
//! processes with different `CUDA_VISIBLE_DEVICES`), or the next host copy
//! lane, in turn, for a memfd.
//!
//! This module is one pure decision over the supervisor's lanes; it must
//! never start, stop or message an actor.

use kvcoord_memory::cuda::device::format_uuid;
use kvcoord_memory::MemoryHandle;
use kvcoord_transport::{ErrorKind, WireError};

/// What a lane copies for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneKind {
    /// A host copy lane (memfd memory).
    Host,
    /// The GPU worker of the device with this UUID.
    Device([u8; 16]),
}

/// Picks the lane for `memory`; `turn` advances the host lanes' rotation.
pub fn route(lanes: &[LaneKind], memory: &MemoryHandle, turn: &mut usize) -> Result<usize, WireError> {
    let invalid = |m: String| WireError::new(ErrorKind::InvalidArgument, m);
    match memory {
        MemoryHandle::HostFd { .. } => {
            let host: Vec<usize> = (0..lanes.len()).filter(|&i| lanes[i] == LaneKind::Host).collect();
            if host.is_empty() {
                return Err(WireError::new(ErrorKind::Internal, "no host copy lane"));
            }
            *turn = turn.wrapping_add(1);
            Ok(host[*turn % host.len()])
        }
        MemoryHandle::CudaIpc { device_uuid, .. } => {
            if !lanes.iter().any(|l| matches!(l, LaneKind::Device(_))) {
                return Err(invalid(
                    "this coordinator runs the host backend; CUDA IPC memory needs the CUDA backend".into(),
                ));
            }
            lanes.iter().position(|l| *l == LaneKind::Device(*device_uuid)).ok_or_else(|| {
                invalid(format!("no GPU with UUID {} is served by this coordinator", format_uuid(device_uuid)))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcoord_memory::CudaIpcLayer;

    fn ipc(uuid: u8) -> MemoryHandle {
        let layer = CudaIpcLayer { handle: vec![0; 64], offset: 0, size: 1 };
        MemoryHandle::CudaIpc { device_uuid: [uuid; 16], layers: vec![layer] }
    }

    /// Two host lanes, then four devices listed out of UUID order (as a
    /// process with a permuted CUDA_VISIBLE_DEVICES would list them).
    fn node() -> Vec<LaneKind> {
        let mut lanes = vec![LaneKind::Host, LaneKind::Host];
        lanes.extend([0xC3, 0xA1, 0xD4, 0xB2].map(|u| LaneKind::Device([u; 16])));
        lanes
    }

    #[test]
    fn ipc_memory_goes_to_the_worker_of_its_gpu_uuid_whatever_the_ordinal_order() {
        let lanes = node();
        let mut turn = 0;
        assert_eq!(route(&lanes, &ipc(0xA1), &mut turn).unwrap(), 3);
        assert_eq!(route(&lanes, &ipc(0xB2), &mut turn).unwrap(), 5);
        assert_eq!(route(&lanes, &ipc(0xC3), &mut turn).unwrap(), 2);
        assert_eq!(route(&lanes, &ipc(0xD4), &mut turn).unwrap(), 4);
        assert_eq!(turn, 0, "device routing does not rotate the host lanes");
    }

    #[test]
    fn tp8_ranks_on_eight_gpus_land_on_eight_distinct_workers() {
        let mut lanes = vec![LaneKind::Host];
        lanes.extend((0..8u8).rev().map(|u| LaneKind::Device([u; 16])));
        let mut turn = 0;
        let picked: std::collections::HashSet<usize> =
            (0..8u8).map(|rank| route(&lanes, &ipc(rank), &mut turn).unwrap()).collect();
        assert_eq!(picked.len(), 8);
        assert!(!picked.contains(&0));
    }

    #[test]
    fn memfd_memory_rotates_over_host_lanes_only() {
        let lanes = node();
        let mut turn = 0;
        let picks: Vec<usize> =
            (0..4).map(|_| route(&lanes, &MemoryHandle::HostFd { size: 1 }, &mut turn).unwrap()).collect();
        assert_eq!(picks, [1, 0, 1, 0]);
    }

    #[test]
    fn an_unknown_gpu_or_a_host_only_coordinator_is_a_typed_invalid_argument() {
        let mut turn = 0;
        let e = route(&node(), &ipc(0xEE), &mut turn).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("GPU-eeeeeeee"), "{}", e.message);
        let e = route(&[LaneKind::Host], &ipc(0xA1), &mut turn).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("host backend"));
    }
}
