//! The JSON messages of the VMM protocol: requests, replies and errors.
//!
//! Requests are objects tagged by `op`. Replies are op-specific objects; failures are an
//! [`ErrorReply`] in an error frame. Unknown fields are rejected so that a typo in a client
//! is an error, not a silently ignored option.

use serde::{Deserialize, Serialize};

use crate::layout::MemoryLayout;
use crate::trap::{Backend, BackendProbe};

/// Every request a client may send. The binary part of the frame is empty except where noted.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Introduces the client; the reply describes the VM and carries its memory fds.
    Hello {
        client: String,
    },
    /// Stops every vCPU (returns once none is running).
    Pause,
    /// Lets every vCPU run again.
    Resume,
    /// Replies with the state blob in the binary part. The VM must be paused.
    SaveState,
    /// Carries a state blob in the binary part. Only in incoming mode, before any restore.
    RestoreState,
    /// Starts KVM dirty logging on every region.
    DirtyLogStart,
    /// Replies with the pages written since the last collect (or start) as a bitmap in the
    /// binary part; collecting resets the log.
    DirtyLogCollect,
    DirtyLogStop,
    Status,
    /// Commits the hand-over on the source: from now on `resume` is refused for good.
    Fence,
    /// Incoming mode: register all RAM with a new userfaultfd; the reply carries it.
    UserfaultfdRegister {
        mode: UffdMode,
    },
    /// Unregister RAM from the userfaultfd and drop the VMM's reference to it.
    UserfaultfdDisarm,
    /// Incoming mode, before the first resume: drop the pages set in the bitmap (binary part,
    /// global page numbering) so that they read as missing again.
    Discard,
    /// Incoming mode, before the first resume: arm KVM Userfault on all RAM with every page
    /// marked. The reply carries the shared bitmap's memfd; from then on the VMM reads nothing
    /// more from this connection and sends userfault events on it.
    KvmUserfaultArm {
        /// Also trap KVM's and the VMM's own accesses to RAM through its host mapping, which
        /// KVM Userfault does not see: the mapping is registered with a userfaultfd in minor
        /// mode, its page-table entries dropped, and the userfaultfd handed over beside the
        /// bitmap. Shared memory (memfd, guest_memfd) only.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        host_accesses: bool,
    },
    /// Turn KVM Userfault off (every page is valid).
    KvmUserfaultDisarm,
    /// A receiver that restarted takes over the armed trap (userfaultfd or KVM Userfault):
    /// the reply carries the trap's descriptors again and, in the binary part, the pages not
    /// yet valid. Under KVM Userfault this connection becomes the event channel, as with
    /// `kvm_userfault_arm`, and the faults of vCPUs already waiting are sent on it again.
    TrapRejoin,
    /// Ends the VMM process after replying.
    Shutdown,
}

impl Request {
    /// The `op` names the protocol defines, for telling an unknown op from a malformed one.
    pub const OPS: &'static [&'static str] = &[
        "hello",
        "pause",
        "resume",
        "save_state",
        "restore_state",
        "dirty_log_start",
        "dirty_log_collect",
        "dirty_log_stop",
        "status",
        "fence",
        "userfaultfd_register",
        "userfaultfd_disarm",
        "discard",
        "kvm_userfault_arm",
        "kvm_userfault_disarm",
        "trap_rejoin",
        "shutdown",
    ];

    pub fn op(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::SaveState => "save_state",
            Self::RestoreState => "restore_state",
            Self::DirtyLogStart => "dirty_log_start",
            Self::DirtyLogCollect => "dirty_log_collect",
            Self::DirtyLogStop => "dirty_log_stop",
            Self::Status => "status",
            Self::Fence => "fence",
            Self::UserfaultfdRegister { .. } => "userfaultfd_register",
            Self::UserfaultfdDisarm => "userfaultfd_disarm",
            Self::Discard => "discard",
            Self::KvmUserfaultArm { .. } => "kvm_userfault_arm",
            Self::KvmUserfaultDisarm => "kvm_userfault_disarm",
            Self::TrapRejoin => "trap_rejoin",
            Self::Shutdown => "shutdown",
        }
    }

    /// Parses a request's JSON part, telling apart the three ways it can be wrong.
    pub fn parse(json: &[u8]) -> Result<Self, ErrorReply> {
        let value: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, format!("invalid JSON: {e}")))?;
        let op = value
            .get("op")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ErrorReply::new(ErrorCode::BadRequest, "missing string field `op`"))?;
        if !Self::OPS.contains(&op) {
            return Err(ErrorReply::new(
                ErrorCode::UnknownOp,
                format!("unknown op `{op}`"),
            ));
        }
        let op = op.to_string();
        crate::strict_json::from_value(value).map_err(|e| {
            ErrorReply::new(
                ErrorCode::BadRequest,
                format!("malformed `{op}` request: {e}"),
            )
        })
    }
}

/// How RAM is registered with userfaultfd.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UffdMode {
    /// Faults on pages not present; resolved with UFFDIO_COPY / UFFDIO_ZEROPAGE.
    Missing,
    /// Faults on page-cache pages not yet mapped (shmem); resolved with UFFDIO_CONTINUE.
    Minor,
}

/// Reply to `userfaultfd_register`; the userfaultfd is descriptor 0.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UffdRegisterReply {
    pub mode: UffdMode,
    /// The features the kernel granted in UFFDIO_API.
    pub features: u64,
    /// The resolving ioctls UFFDIO_REGISTER allows on the RAM (bit n = ioctl number n).
    pub ioctls: u64,
}

/// Reply to `kvm_userfault_arm`; the bitmap's memfd is descriptor 0. Its layout: a header of
/// `header_bytes` (u32 wake counter at 0, u32 sleeper count at 4) and then the bitmap, one bit
/// per page of the layout's global numbering, little-endian u64 words.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KvmUserfaultArmReply {
    pub pages: u64,
    pub header_bytes: u64,
    /// Whether the host mapping is registered with a userfaultfd in minor mode, which is then
    /// descriptor 1 (`host_accesses` was asked for and the kernel allowed it).
    #[serde(default)]
    pub host_accesses: bool,
}

/// Reply to `trap_rejoin`. Descriptors: the userfaultfd (`userfaultfd`), or the bitmap's
/// memfd and, with `host_accesses`, the host mapping's userfaultfd (`kvm-userfault`). The
/// binary part is a bitmap of the pages not yet valid (global numbering): still marked under
/// KVM Userfault, not present in RAM under userfaultfd's missing mode.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrapRejoinReply {
    pub trap: Backend,
    pub pages: u64,
    /// How many pages the binary part marks.
    pub invalid: u64,
    /// `kvm-userfault`: the bitmap memfd's header length, as in `kvm_userfault_arm`.
    #[serde(default)]
    pub header_bytes: u64,
    #[serde(default)]
    pub host_accesses: bool,
    /// How many vCPUs were waiting for a page when the trap was handed over.
    pub waiting_vcpus: u32,
}

/// Unsolicited messages from the VMM (frame kind 4).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// A vCPU touched a page marked in the KVM Userfault bitmap and waits for it.
    Userfault { vcpu: u32, gpa: u64, page: u64 },
}

/// Why a request failed.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame itself was malformed; the VMM closes the connection after this reply.
    BadFrame,
    UnsupportedVersion,
    /// The JSON was invalid or did not fit the op.
    BadRequest,
    UnknownOp,
    /// The request is valid but not now (e.g. `save_state` while running).
    InvalidState,
    /// This VMM or kernel cannot do it; the message names the capability probed.
    Unavailable,
    /// The VMM tried and the operation failed.
    Failed,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{code:?}: {message}")]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The VM as a whole.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Incoming mode, no state restored yet: no vCPU may run.
    Incoming,
    Running,
    Paused,
    /// Paused for good: the hand-over was committed and this VM must never run again.
    Fenced,
    /// Every vCPU executed `hlt` (or stopped on an error).
    Halted,
}

/// The names of the optional capabilities a VMM reports in `hello`, one constant per name so
/// that both ends of the protocol spell them the same way (a misspelt name would silently read
/// as "not offered"). On the wire a capability's name is a string, so a VMM may report
/// capabilities this build does not know; they are kept and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CapabilityName {
    /// `dirty_log_start` / `dirty_log_collect` / `dirty_log_stop` work.
    DirtyLog,
    /// `save_state` works.
    SaveState,
    /// `restore_state` works (incoming mode, not yet restored).
    RestoreState,
    /// `userfaultfd_register` works: the userfaultfd trap backend.
    Userfaultfd,
    /// `kvm_userfault_arm` works: the KVM Userfault trap backend.
    KvmUserfault,
}

impl CapabilityName {
    pub const ALL: [CapabilityName; 5] = [
        Self::DirtyLog,
        Self::SaveState,
        Self::RestoreState,
        Self::Userfaultfd,
        Self::KvmUserfault,
    ];

    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DirtyLog => "dirty-log",
            Self::SaveState => "save-state",
            Self::RestoreState => "restore-state",
            Self::Userfaultfd => Backend::Userfaultfd.as_str(),
            Self::KvmUserfault => Backend::KvmUserfault.as_str(),
        }
    }
}

impl From<Backend> for CapabilityName {
    /// The capability that says whether a VMM can arm `backend`.
    fn from(backend: Backend) -> Self {
        match backend {
            Backend::Userfaultfd => Self::Userfaultfd,
            Backend::KvmUserfault => Self::KvmUserfault,
        }
    }
}

impl std::fmt::Display for CapabilityName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One optional capability of the VMM, with the reason when it is unavailable.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Capability {
    /// A [`CapabilityName`] on the wire (a string, so unknown names parse).
    pub name: String,
    pub available: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Capability {
    /// `name` is available.
    pub fn available(name: CapabilityName) -> Self {
        Self {
            name: name.as_str().into(),
            available: true,
            reason: None,
        }
    }

    /// `name` is unavailable, and `reason` says what was probed.
    pub fn unavailable(name: CapabilityName, reason: impl Into<String>) -> Self {
        Self {
            name: name.as_str().into(),
            available: false,
            reason: Some(reason.into()),
        }
    }

    /// Whether this is the capability `name`.
    pub fn is(&self, name: CapabilityName) -> bool {
        self.name == name.as_str()
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HelloReply {
    pub protocol: u16,
    /// Name and version of the VMM implementation.
    pub vmm: String,
    pub vm_id: String,
    pub vcpus: u32,
    pub incoming: bool,
    pub state: VmState,
    /// The layout; its `fd` fields index the descriptors attached to this reply.
    pub layout: MemoryLayout,
    pub capabilities: Vec<Capability>,
}

impl HelloReply {
    pub fn capability(&self, name: CapabilityName) -> Option<&Capability> {
        self.capabilities.iter().find(|c| c.is(name))
    }

    /// Whether the VMM reports `name` available (a capability it does not list is not).
    pub fn has(&self, name: CapabilityName) -> bool {
        self.capability(name).is_some_and(|c| c.available)
    }

    /// The trap backends this VMM can arm for its memory, in the form node probes take, for
    /// [`crate::trap::choose`]. A backend the VMM does not list is left out.
    pub fn trap_offers(&self) -> Vec<BackendProbe> {
        let Some(backing) = self.layout.regions.first().map(|r| r.backing) else {
            return Vec::new();
        };
        Backend::ALL
            .into_iter()
            .filter_map(|backend| {
                let c = self.capability(backend.into())?;
                Some(BackendProbe {
                    backing,
                    backend,
                    available: c.available,
                    reason: match &c.reason {
                        Some(r) => r.clone(),
                        None if c.available => format!("the VMM offers {backend}"),
                        None => format!("the VMM does not offer {backend}"),
                    },
                })
            })
            .collect()
    }
}

/// Reply to `pause`, `resume`, `fence`, `restore_state`, `dirty_log_start`/`stop`, `shutdown`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StateReply {
    pub state: VmState,
}

/// Reply to `save_state`; the blob is the binary part.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    /// Identifies the blob's format, so a VMM can refuse another implementation's state.
    pub format: String,
    pub version: u32,
    pub bytes: u64,
}

/// Reply to `dirty_log_collect`; the bitmap (global page numbering) is the binary part.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DirtyLogReply {
    pub pages: u64,
    pub dirty: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VcpuState {
    /// Created, waiting for a restored state (incoming mode).
    Incoming,
    Running,
    Paused,
    Halted,
    /// Stopped because KVM or the guest did something the VMM cannot continue from.
    Failed,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VcpuStatus {
    pub index: u32,
    pub state: VcpuState,
    /// Heartbeats (port 0xF0 writes) counted so far, including those counted on the source
    /// before a hand-over.
    pub heartbeats: u64,
    /// The last value written to the heartbeat port.
    pub progress: u32,
    /// The last value written to the status port (0xF2).
    pub status_word: u32,
    /// Why the vCPU stopped, when `state` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The page this vCPU waits for under KVM Userfault, if it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<PageWait>,
}

/// A vCPU waiting for a page that has not arrived (KVM Userfault).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PageWait {
    pub page: u64,
    pub gpa: u64,
    /// How long it has waited so far.
    pub waited_ms: u64,
}

/// Reply to `status`, and the VMM's final report.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmStatus {
    pub vm_id: String,
    pub state: VmState,
    /// Heartbeats per vCPU (the same numbers as in `vcpu_status`, for quick reading).
    pub heartbeats: Vec<u64>,
    /// Verification failures the guest reported (port 0xF1), over the VM's whole life.
    pub failures: u64,
    /// The page numbers reported, in order (the first 1024).
    pub failed_pages: Vec<u64>,
    pub vcpu_status: Vec<VcpuStatus>,
    pub dirty_log_active: bool,
    /// Time the vCPUs have been allowed to run in this process, in milliseconds.
    pub run_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_distinguishes_errors() {
        assert_eq!(Request::parse(br#"{"op":"pause"}"#), Ok(Request::Pause));
        assert_eq!(
            Request::parse(br#"{"op":"hello","client":"t"}"#),
            Ok(Request::Hello { client: "t".into() })
        );
        assert_eq!(
            Request::parse(b"{nope").unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            Request::parse(b"[1,2]").unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            Request::parse(br#"{"op":"fly"}"#).unwrap_err().code,
            ErrorCode::UnknownOp
        );
        assert_eq!(
            Request::parse(br#"{"op":"pause","extra":1}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            Request::parse(br#"{"op":"hello"}"#).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn every_op_round_trips() {
        let all = [
            Request::Hello { client: "c".into() },
            Request::Pause,
            Request::Resume,
            Request::SaveState,
            Request::RestoreState,
            Request::DirtyLogStart,
            Request::DirtyLogCollect,
            Request::DirtyLogStop,
            Request::Status,
            Request::Fence,
            Request::UserfaultfdRegister {
                mode: UffdMode::Minor,
            },
            Request::UserfaultfdDisarm,
            Request::Discard,
            Request::KvmUserfaultArm {
                host_accesses: false,
            },
            Request::KvmUserfaultArm {
                host_accesses: true,
            },
            Request::KvmUserfaultDisarm,
            Request::TrapRejoin,
            Request::Shutdown,
        ];
        // The flag's default keeps the plain form.
        assert_eq!(
            Request::parse(br#"{"op": "kvm_userfault_arm"}"#),
            Ok(Request::KvmUserfaultArm {
                host_accesses: false
            })
        );
        assert_eq!(all.len(), Request::OPS.len() + 1);
        for r in all {
            let json = serde_json::to_vec(&r).unwrap();
            assert_eq!(Request::parse(&json), Ok(r.clone()));
            assert!(Request::OPS.contains(&r.op()));
        }
    }

    #[test]
    fn capability_names_and_trap_offers() {
        let names: Vec<&str> = CapabilityName::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "dirty-log",
                "save-state",
                "restore-state",
                "userfaultfd",
                "kvm-userfault"
            ]
        );
        let hello: HelloReply = serde_json::from_value(serde_json::json!({
            "protocol": 2, "vmm": "v", "vm_id": "vm", "vcpus": 1, "incoming": true,
            "state": "incoming",
            "layout": {"regions": [{"guest_phys_addr": 0, "size": 4096, "backing": "memfd",
                "fd": 0, "file_offset": 0, "page_size": 4096, "host_addr": 4096}]},
            "capabilities": [
                {"name": "userfaultfd", "available": true},
                {"name": "kvm-userfault", "available": false, "reason": "EINVAL"},
                {"name": "teleport", "available": true}
            ]
        }))
        .unwrap();
        assert!(hello.has(CapabilityName::Userfaultfd));
        assert!(
            !hello.has(CapabilityName::DirtyLog),
            "not listed: not available"
        );
        let offers = hello.trap_offers();
        assert_eq!(offers.len(), 2);
        assert_eq!(
            (
                offers[1].backend,
                offers[1].available,
                offers[1].reason.as_str()
            ),
            (Backend::KvmUserfault, false, "EINVAL")
        );
        assert_eq!(offers[0].backing, crate::layout::BackingKind::Memfd);
    }
}
