//! Arming and disarming the trap: the backend is picked by the core's one rule
//! (`faultline::trap::choose`) from what this VMM offers for its memory, so the target and the
//! operator, which applied the same rule to the node's probes, agree.

use anyhow::Context;
use faultline::guest_memory::GuestMemory;
use faultline::layout::BackingKind;
use faultline::postcopy::Installer;
use faultline::sidecar_api::Mode;
use faultline::sys::uffd::Userfaultfd;
use faultline::trap::kvm_userfault::UserfaultBitmap;
use faultline::trap::{self, Armed, Backend};
use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::messages::{ErrorCode, UffdMode};

use super::Target;
use crate::migration::Stop;

/// What the target installs pages with: the installer (holding the armed trap, if any) and,
/// under KVM Userfault, the VMM connection its fault events arrive on.
pub(super) struct ArmedTrap {
    pub installer: Installer,
    pub events: Option<VmmClient>,
}

impl Target<'_> {
    /// Picks and arms the trap the source's plan needs (none when the migration cannot end in
    /// post-copy, or a hybrid one falls back to pre-copy), and starts preallocating
    /// file-backed memory when pre-copy passes will fill it.
    pub(super) fn arm(
        &mut self,
        mode: Mode,
        postcopy: bool,
        mem: GuestMemory,
        precopy: bool,
    ) -> Result<ArmedTrap, Stop> {
        let m = self.m;
        let backing = self
            .hello
            .layout
            .regions
            .first()
            .map(|r| r.backing)
            .ok_or_else(|| Stop::failed("the VMM reports no memory"))?;
        let backend = if postcopy {
            let choice = trap::choose(m.policy.trap, mode, backing, &self.hello.trap_offers())
                .map_err(Stop::failed)?;
            if choice.backend.is_none() {
                tracing::warn!(
                    "post-copy unavailable, offering pre-copy only: {}",
                    choice.reason
                );
                m.set_message(format!("post-copy unavailable: {}", choice.reason));
            }
            choice.backend
        } else {
            None
        };
        let (armed, events) = match backend {
            None => (None, None),
            Some(Backend::Userfaultfd) => {
                let (_, fd) = self
                    .vmm
                    .userfaultfd_register(UffdMode::Missing)
                    .context("the VMM could not register RAM with userfaultfd")?;
                (Some(Armed::Userfaultfd(Userfaultfd::from(fd))), None)
            }
            Some(Backend::KvmUserfault) => {
                let (bitmap, host, events) = self.arm_kvm_userfault(backing)?;
                (Some(Armed::KvmUserfault { bitmap, host }), Some(events))
            }
        };
        let installer = Installer::new(mem, armed);
        m.set_trap(installer.trap());
        let all_anon = self
            .hello
            .layout
            .regions
            .iter()
            .all(|r| r.backing == BackingKind::Anon);
        if precopy && !all_anon {
            installer
                .start_preallocation()
                .context("cannot start preallocating memory")?;
        }
        Ok(ArmedTrap { installer, events })
    }

    /// Arms KVM Userfault on a second VMM connection, which then carries the fault events.
    /// On guest_memfd memory the VMM is asked to trap its own and KVM's accesses too (the
    /// host half); where its kernel cannot, the arming is retried without it and the
    /// migration says that those accesses go untrapped. Not on memfd memory: there, minor mode
    /// reports only pages already in the file, so a page that was never sent would read as
    /// zeros untrapped (memfd migrates under userfaultfd's missing mode by default, which
    /// traps every access).
    fn arm_kvm_userfault(
        &mut self,
        backing: BackingKind,
    ) -> Result<(UserfaultBitmap, Option<Userfaultfd>, VmmClient), Stop> {
        let connect = || {
            VmmClient::connect(&self.sidecar.vmm_socket)
                .context("cannot open the VMM's event connection")
        };
        let mut events = connect()?;
        let want_host = backing == BackingKind::GuestMemfd;
        let (reply, fd, host) = match events.kvm_userfault_arm(want_host) {
            Ok(armed) => armed,
            Err(e)
                if want_host
                    && e.refusal()
                        .is_some_and(|r| r.code == ErrorCode::Unavailable) =>
            {
                let why = e.to_string();
                tracing::warn!(
                    "KVM's own accesses to pages not yet arrived will not be trapped: {why}"
                );
                self.m.set_message(format!(
                    "KVM Userfault traps vCPU accesses only; KVM's own accesses are not trapped: {why}"
                ));
                events = connect()?;
                events
                    .kvm_userfault_arm(false)
                    .context("the VMM could not arm KVM Userfault")?
            }
            Err(e) => {
                return Err(Stop::from(
                    anyhow::Error::new(e).context("the VMM could not arm KVM Userfault"),
                ));
            }
        };
        let bitmap = UserfaultBitmap::open_shared(fd, reply.pages)
            .context("cannot map the VMM's userfault bitmap")?;
        tracing::info!(host_accesses = host.is_some(), "KVM Userfault armed");
        Ok((bitmap, host.map(Userfaultfd::from), events))
    }

    /// Takes over the trap an earlier run of this sidecar armed (see `trap_rejoin` in the VMM
    /// protocol): its descriptors again, and every page valid that the VMM does not report
    /// invalid.
    pub(super) fn rejoin_trap(&mut self, mem: GuestMemory) -> Result<ArmedTrap, Stop> {
        let mut events = VmmClient::connect(&self.sidecar.vmm_socket)
            .context("cannot open a VMM connection for the trap")?;
        let (reply, fds, invalid) = events
            .trap_rejoin()
            .context("the VMM could not hand over its trap")?;
        let mut fds = fds.into_iter();
        let first = fds
            .next()
            .ok_or_else(|| Stop::failed("the VMM handed over no trap descriptor"))?;
        let (armed, events) = match reply.trap {
            Backend::Userfaultfd => (Armed::Userfaultfd(Userfaultfd::from(first)), None),
            Backend::KvmUserfault => {
                let bitmap = UserfaultBitmap::open_shared(first, reply.pages)
                    .context("cannot map the VMM's userfault bitmap")?;
                let host = fds.next().map(Userfaultfd::from);
                (Armed::KvmUserfault { bitmap, host }, Some(events))
            }
        };
        let installer = Installer::new(mem, Some(armed));
        installer.states().set_valid_except(&invalid);
        self.m.set_trap(installer.trap());
        tracing::info!(
            trap = %reply.trap,
            invalid = reply.invalid,
            waiting_vcpus = reply.waiting_vcpus,
            host_accesses = reply.host_accesses,
            "trap rejoined"
        );
        Ok(ArmedTrap { installer, events })
    }

    /// Every page is valid: the VMM drops the trap (and, for userfaultfd, its own reference).
    pub(super) fn disarm(&mut self, installer: &Installer) -> Result<(), Stop> {
        match installer.trap() {
            Some(Backend::Userfaultfd) => {
                self.vmm
                    .userfaultfd_disarm()
                    .context("cannot disarm the userfaultfd")?;
            }
            Some(Backend::KvmUserfault) => {
                self.vmm
                    .kvm_userfault_disarm()
                    .context("cannot disarm KVM Userfault")?;
            }
            None => {}
        }
        Ok(())
    }
}
