/*
 * pc-boot: runs memtouch on a PC-compatible VMM that boots multiboot kernels (QEMU's
 * `-kernel`), so that another VMM can be measured with exactly the guest workload the
 * reference VMM runs. One vCPU; RAM below 4 GiB only (at most 3 GiB).
 *
 * The image is flat: the multiboot header with the "a.out kludge" (load addresses in the
 * header, so no ELF is needed), an argument block the harness fills in before boot, this
 * stub, and memtouch (assembled first, included whole). It loads at 1 MiB.
 *
 * The stub recreates what the reference VMM's boot code gives memtouch (docs/guest-abi.md):
 * the GDT at 0x1000, the arguments at 0x2000, page tables at 0x3000 mapping RAM 1:1 with
 * 2 MiB pages, the stack of vCPU 0, and the entry registers. memtouch itself is
 * position-independent, so it runs where it was loaded, just after the stub.
 *
 * For memtouch's PC mode it also maps the local APIC (uncached), programs its timer as a
 * one-shot on vector 0x20 counting nanoseconds (KVM's APIC bus runs at 1 GHz) and installs
 * an IDT whose timer handler only acknowledges the interrupt. The legacy PIC is masked, so
 * nothing else interrupts a halt.
 *
 * The argument block is found by its tag, "FLTARGS1", followed by a u64 count (at most
 * ARGS_MAX) and the values.
 */
        .intel_syntax noprefix
        .text

        .equ LOAD,            0x100000
        .equ MB_MAGIC,        0x1BADB002
        .equ MB_FLAGS,        0x00010002      /* memory info, address fields */
        .equ MB_BOOT_MAGIC,   0x2BADB002
        .equ GDT,             0x1000
        .equ GDT_PTR,         0x1018
        .equ IDT_PTR,         0x1030
        .equ RAM_SIZE,        0x1040
        .equ IDT,             0x1100
        .equ ARGS,            0x2000
        .equ PML4,            0x3000
        .equ PDPT,            0x4000
        .equ PD,              0x5000           /* four page directories: 4 GiB */
        .equ PT_END,          0x9000
        .equ STACK_TOP,       0x82000          /* vCPU 0: 0x80000 + 1 * 0x2000 */
        .equ FREE_ADDR,       0x200000
        .equ APIC,            0xFEE00000
        .equ TIMER_VECTOR,    0x20
        .equ SPURIOUS_VECTOR, 0xFF
        .equ ARGS_MAX,        16
        .equ MAX_2M_PAGES,    1536             /* 3 GiB */

        .code32
start:
mb_header:
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)
        .long   LOAD + (mb_header - start)     /* header_addr */
        .long   LOAD                           /* load_addr */
        .long   0                              /* load_end_addr: the whole file */
        .long   0                              /* bss_end_addr: none */
        .long   LOAD + (entry32 - start)       /* entry_addr */

        .balign 8
        .ascii  "FLTARGS1"
args_count:
        .quad   0
args_values:
        .fill   ARGS_MAX, 8, 0

entry32:
        cli
        cmp     eax, MB_BOOT_MAGIC
        jne     stop32
        test    byte ptr [ebx], 1              /* mem_lower/mem_upper valid? */
        jz      stop32

        mov     al, 0xFF                       /* mask both PICs */
        out     0x21, al
        out     0xA1, al

        mov     esi, [ebx + 8]                 /* KiB above 1 MiB */
        add     esi, 1024
        shr     esi, 11                        /* whole 2 MiB pages of RAM */
        cmp     esi, MAX_2M_PAGES
        jbe     1f
        mov     esi, MAX_2M_PAGES
1:      mov     eax, esi
        shl     eax, 21
        mov     dword ptr [RAM_SIZE], eax
        mov     dword ptr [RAM_SIZE + 4], 0

        mov     edi, PML4                      /* page tables: zero, then fill */
        mov     ecx, (PT_END - PML4) / 4
        xor     eax, eax
        rep stosd
        mov     dword ptr [PML4], PDPT + 3
        mov     dword ptr [PDPT], PD + 3
        mov     dword ptr [PDPT + 8], PD + 0x1000 + 3
        mov     dword ptr [PDPT + 16], PD + 0x2000 + 3
        mov     dword ptr [PDPT + 24], PD + 0x3000 + 3
        xor     ecx, ecx
2:      mov     eax, ecx
        shl     eax, 21
        or      eax, 0x83                      /* present, writable, 2 MiB */
        mov     [PD + ecx * 8], eax
        inc     ecx
        cmp     ecx, esi
        jb      2b
        mov     dword ptr [PD + (APIC >> 21) * 8], APIC + 0x9B  /* + PWT, PCD */

        mov     dword ptr [GDT], 0
        mov     dword ptr [GDT + 4], 0
        mov     dword ptr [GDT + 8], 0
        mov     dword ptr [GDT + 12], 0x00209A00   /* 0x08: 64-bit code */
        mov     dword ptr [GDT + 16], 0
        mov     dword ptr [GDT + 20], 0x00009200   /* 0x10: data */
        mov     word ptr [GDT_PTR], 23
        mov     dword ptr [GDT_PTR + 2], GDT
        lgdt    [GDT_PTR]

        mov     eax, cr4
        or      eax, 0x20                      /* PAE */
        mov     cr4, eax
        mov     eax, PML4
        mov     cr3, eax
        mov     ecx, 0xC0000080                /* EFER.LME */
        rdmsr
        or      eax, 0x100
        wrmsr
        mov     eax, cr0
        or      eax, 0x80000001                /* PG, PE */
        mov     cr0, eax
        push    0x08
        push    LOAD + (entry64 - start)
        retf

stop32:
        hlt
        jmp     stop32

        .code64
entry64:
        mov     eax, 0x10
        mov     ds, eax
        mov     es, eax
        mov     ss, eax
        xor     eax, eax
        mov     fs, eax
        mov     gs, eax
        mov     rsp, STACK_TOP

        mov     edi, IDT                       /* IDT: the timer and the spurious vector */
        mov     ecx, 256 * 2
        xor     eax, eax
        rep stosq
        lea     rax, [rip + timer_isr]
        mov     rdi, IDT + TIMER_VECTOR * 16
        call    set_gate
        lea     rax, [rip + spurious_isr]
        mov     rdi, IDT + SPURIOUS_VECTOR * 16
        call    set_gate
        mov     word ptr [IDT_PTR], 256 * 16 - 1
        mov     qword ptr [IDT_PTR + 2], IDT
        lidt    [IDT_PTR]

        mov     rdi, APIC
        mov     dword ptr [rdi + 0xF0], 0x100 + SPURIOUS_VECTOR   /* enable */
        mov     dword ptr [rdi + 0x3E0], 0xB                      /* divide by 1 */
        mov     dword ptr [rdi + 0x320], TIMER_VECTOR             /* one-shot */

        lea     rsi, [rip + args_values]       /* the arguments, where the ABI puts them */
        mov     rcx, [rip + args_count]
        cmp     rcx, ARGS_MAX
        jbe     1f
        mov     ecx, ARGS_MAX
1:      mov     r9, rcx
        mov     edi, ARGS
        rep movsq

        xor     edi, edi                       /* vCPU 0 */
        mov     esi, 1                         /* of 1 */
        mov     rdx, [RAM_SIZE]
        mov     ecx, FREE_ADDR
        mov     r8d, ARGS
        xor     eax, eax
        xor     ebx, ebx
        xor     ebp, ebp
        xor     r10d, r10d
        xor     r11d, r11d
        xor     r12d, r12d
        xor     r13d, r13d
        xor     r14d, r14d
        xor     r15d, r15d
        jmp     memtouch

/* set_gate: rdi = IDT entry, rax = handler: a present 64-bit interrupt gate. */
set_gate:
        mov     word ptr [rdi], ax
        mov     word ptr [rdi + 2], 0x08
        mov     word ptr [rdi + 4], 0x8E00
        shr     rax, 16
        mov     word ptr [rdi + 6], ax
        shr     rax, 16
        mov     dword ptr [rdi + 8], eax
        ret

timer_isr:
        push    rdi
        mov     rdi, APIC
        mov     dword ptr [rdi + 0xB0], 0      /* end of interrupt */
        pop     rdi
        iretq

spurious_isr:
        iretq

        .balign 16
memtouch:
        .incbin "memtouch.bin"
