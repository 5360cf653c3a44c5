//! The guest's starting point: the boot image written into RAM (GDT, page tables mapping RAM
//! linearly, program, arguments) and the 64-bit register state every vCPU starts from, as
//! `docs/guest-abi.md` specifies. Only for fresh VMs: an incoming VM gets all of this from its
//! source, so nothing here runs in incoming mode.

use faultline::sys::MmapRegion;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::ram_map::RamMap;

/// Global descriptor table: null, 64-bit code (selector 0x08), data (selector 0x10).
pub const GDT_ADDR: u64 = 0x1000;
/// The u64 argument array handed to the program in R8 (count in R9).
pub const ARGS_ADDR: u64 = 0x2000;
pub const MAX_ARGS: usize = 512;
const PML4_ADDR: u64 = 0x3000;
const PDPT_ADDR: u64 = 0x4000;
/// Page directories, one per GiB of RAM: 64 pages for the 64 GiB maximum.
const PD_ADDR: u64 = 0x5000;
/// Private stacks, one per vCPU, growing down from `STACKS_ADDR + (i + 1) * STACK_SIZE`.
pub const STACKS_ADDR: u64 = 0x8_0000;
pub const STACK_SIZE: u64 = 0x2000;
/// Where the program is loaded and where every vCPU starts.
pub const LOAD_ADDR: u64 = 0x10_0000;
pub const MAX_PROGRAM_LEN: usize = 0x10_0000;
/// The first byte the program may use freely (RCX).
pub use faultline_vmm::guest::FREE_ADDR;
/// RAM must be a whole number of the 2 MiB pages the identity map uses.
pub const RAM_ALIGN: u64 = 2 << 20;
pub const MAX_RAM: u64 = 64 << 30;

// The low-memory map holds for the largest VM: 64 page directories below the stacks, 64 stacks
// below the program.
const _: () = assert!(PD_ADDR + 64 * 4096 <= STACKS_ADDR);
const _: () = assert!(STACKS_ADDR + 64 * STACK_SIZE <= LOAD_ADDR);
const _: () = assert!(LOAD_ADDR + MAX_PROGRAM_LEN as u64 <= FREE_ADDR);

const SEL_CODE: u16 = 0x08;
const SEL_DATA: u16 = 0x10;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the guest program is {0} bytes; at most {MAX_PROGRAM_LEN} fit at the load address")]
    ProgramTooLarge(usize),
    #[error("the guest program is empty")]
    EmptyProgram,
    #[error("{0} guest arguments given; at most {MAX_ARGS} are supported")]
    TooManyArgs(usize),
    #[error("RAM of {0} bytes is not a multiple of 2 MiB between 64 MiB and 64 GiB")]
    BadRamSize(u64),
    #[error(transparent)]
    Write(#[from] faultline::sys::MmapError),
}

/// Writes the GDT, the page tables, the arguments and the program. Everything lands in the
/// first 2 MiB of RAM, which is always at guest-physical 0, so RAM offsets are guest-physical
/// addresses here.
///
/// The page tables map the guest's virtual addresses 0 .. RAM size onto RAM's parts in order:
/// the identity below the hole, and past it virtual address X at guest-physical
/// 4 GiB + (X − RAM below 4 GiB). A program sees one contiguous RAM whatever the split, and
/// its virtual page numbers are the layout's global page numbers.
pub fn write_boot_image(
    ram: &MmapRegion,
    map: &RamMap,
    program: &[u8],
    args: &[u64],
) -> Result<(), BootError> {
    let ram_size = map.size();
    if !(64 << 20..=MAX_RAM).contains(&ram_size) || !ram_size.is_multiple_of(RAM_ALIGN) {
        return Err(BootError::BadRamSize(ram_size));
    }
    if program.is_empty() {
        return Err(BootError::EmptyProgram);
    }
    if program.len() > MAX_PROGRAM_LEN {
        return Err(BootError::ProgramTooLarge(program.len()));
    }
    if args.len() > MAX_ARGS {
        return Err(BootError::TooManyArgs(args.len()));
    }

    let gdt: [u64; 3] = [0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];
    ram.write(GDT_ADDR, &words(&gdt))?;

    // PML4[0] -> PDPT; PDPT[g] -> PD for virtual GiB g; each PD maps 512 x 2 MiB.
    ram.write(
        PML4_ADDR,
        &(PDPT_ADDR | PTE_PRESENT | PTE_WRITE).to_le_bytes(),
    )?;
    let huge_pages = ram_size / RAM_ALIGN;
    let gibs = huge_pages.div_ceil(512);
    let pdpt: Vec<u64> = (0..gibs)
        .map(|g| (PD_ADDR + g * 4096) | PTE_PRESENT | PTE_WRITE)
        .collect();
    ram.write(PDPT_ADDR, &words(&pdpt))?;
    let pds: Vec<u64> = (0..huge_pages)
        .map(|p| {
            // Every 2 MiB of RAM lies in one part: parts are 2 MiB aligned (RamMap checks).
            let gpa = map.gpa_of_offset(p * RAM_ALIGN).unwrap_or_default();
            gpa | PTE_PRESENT | PTE_WRITE | PTE_HUGE
        })
        .collect();
    ram.write(PD_ADDR, &words(&pds))?;

    ram.write(ARGS_ADDR, &words(args))?;
    ram.write(LOAD_ADDR, program)?;
    Ok(())
}

fn words(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Long mode with paging on, flat segments from the GDT above.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector: SEL_CODE,
        type_: 0xB,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: SEL_DATA,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// The registers of vCPU `index` at the program's first instruction.
pub fn entry_regs(index: u32, vcpus: u32, ram_size: u64, nargs: usize) -> kvm_regs {
    kvm_regs {
        rip: LOAD_ADDR,
        rflags: 0x2,
        rdi: u64::from(index),
        rsi: u64::from(vcpus),
        rdx: ram_size,
        rcx: FREE_ADDR,
        rsp: STACKS_ADDR + (u64::from(index) + 1) * STACK_SIZE,
        r8: ARGS_ADDR,
        r9: nargs as u64,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_part(size: u64) -> RamMap {
        RamMap::pc(size, crate::ram_map::DEFAULT_BELOW_4G).unwrap()
    }

    #[test]
    fn image_layout() {
        let ram = MmapRegion::anonymous(64 << 20).unwrap();
        write_boot_image(&ram, &one_part(64 << 20), &[0x90, 0xF4], &[1, 2, 3]).unwrap();
        assert_eq!(ram.read_u64(PML4_ADDR).unwrap(), PDPT_ADDR | 3);
        assert_eq!(ram.read_u64(PDPT_ADDR).unwrap(), PD_ADDR | 3);
        assert_eq!(ram.read_u64(PDPT_ADDR + 8).unwrap(), 0, "only 1 GiB mapped");
        // 32 huge pages for 64 MiB, the last at 62 MiB.
        assert_eq!(ram.read_u64(PD_ADDR + 31 * 8).unwrap(), (62 << 20) | 0x83);
        assert_eq!(ram.read_u64(PD_ADDR + 32 * 8).unwrap(), 0);
        assert_eq!(ram.read_u64(ARGS_ADDR + 16).unwrap(), 3);
        let mut code = [0u8; 2];
        ram.read(LOAD_ADDR, &mut code).unwrap();
        assert_eq!(code, [0x90, 0xF4]);
    }

    #[test]
    fn ram_past_the_hole_is_mapped_after_low_ram() {
        let ram = MmapRegion::anonymous(128 << 20).unwrap();
        let map = RamMap::pc(128 << 20, 64 << 20).unwrap();
        write_boot_image(&ram, &map, &[0xF4], &[]).unwrap();
        // Virtual 62 MiB is the last low huge page; virtual 64 MiB is guest-physical 4 GiB.
        assert_eq!(ram.read_u64(PD_ADDR + 31 * 8).unwrap(), (62 << 20) | 0x83);
        assert_eq!(ram.read_u64(PD_ADDR + 32 * 8).unwrap(), (4 << 30) | 0x83);
        assert_eq!(
            ram.read_u64(PD_ADDR + 63 * 8).unwrap(),
            ((4 << 30) + (62 << 20)) | 0x83
        );
        assert_eq!(ram.read_u64(PD_ADDR + 64 * 8).unwrap(), 0);
    }

    #[test]
    fn rejects_bad_images() {
        let ram = MmapRegion::anonymous(64 << 20).unwrap();
        assert!(matches!(
            write_boot_image(&ram, &one_part(62 << 20), &[0xF4], &[]),
            Err(BootError::BadRamSize(_))
        ));
        assert!(matches!(
            write_boot_image(&ram, &one_part(64 << 20), &[], &[]),
            Err(BootError::EmptyProgram)
        ));
        assert!(matches!(
            write_boot_image(
                &ram,
                &one_part(64 << 20),
                &vec![0; MAX_PROGRAM_LEN + 1],
                &[]
            ),
            Err(BootError::ProgramTooLarge(_))
        ));
        assert!(matches!(
            write_boot_image(&ram, &one_part(64 << 20), &[0xF4], &[0; MAX_ARGS + 1]),
            Err(BootError::TooManyArgs(_))
        ));
    }
}
