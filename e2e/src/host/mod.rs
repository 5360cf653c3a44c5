//! The host side of the boot matrix: kernels, initramfs, QEMU, and the matrix itself.

pub mod initramfs;
pub mod kernels;
pub mod matrix;
pub mod qemu;
