/*
 * memtouch: Faultline's self-verifying memory workload (guest ABI: docs/guest-abi.md).
 *
 * Every working-set page carries content derived from its page number (gfn: virtual address
 * / 4096, which the VMM's page tables make the global page number of RAM) and
 * a 32-bit generation kept in a table in guest memory:
 *   generation 0  -> the page was never written and must read as zeros;
 *   generation g  -> word k of the page holds ((gfn << 32) | g) + k.
 * The quick check reads words 0, 256 and 511 (first, middle, last); flag bit 0 checks and
 * writes all 512 words instead (about 1 ms per page on an emulating KVM).
 *
 * Each vCPU owns a contiguous share of the working set and loops:
 *   1. pick a page of its share pseudo-randomly (xorshift64), verify it, and with probability
 *      write_per_1024/1024 bump its generation and rewrite it;
 *   2. verify one more page at a sequential cursor, so every page of the share is verified
 *      once per sweep; a completed sweep is announced on the status port;
 *   3. every hb_interval iterations, write the iteration count to the heartbeat port and, if
 *      sleep_us is non-zero, sleep that long through the sleep port.
 * A mismatch writes the page's gfn to the failure port and rewrites the page, so each
 * corruption is reported once.
 *
 * Arguments (u64 array at R8, count in R9; [6] and [7] may be left out):
 *   [0] working set, per mille of the usable pages     [4] sleep_us after each heartbeat
 *   [1] write_per_1024 (0..1024)                        [5] seed
 *   [2] flags: bit 0 = full-page verification,          [6] pace: iterations per second,
 *       bit 1 = PC mode (below), bit 2 = prefill            0 = as fast as it can
 *   [3] hb_interval (iterations, >= 1)                  [7] TSC ticks per millisecond
 *
 * Pacing: with a pace, each batch of hb_interval iterations has a deadline on the TSC, and
 * after a heartbeat the vCPU sleeps until its batch's deadline. A vCPU more than one batch
 * late (stalled by a fault, say) starts afresh from now: work it could not do stays undone,
 * so a harness can count the guest time a migration cost. A TSC that jumps more than a batch
 * either way (a VMM that does not carry it over) restarts the schedule too.
 *
 * PC mode, for VMMs without the reference VMM's ports (QEMU, booted by guest/pc-boot.S):
 * reports go to the debug console (port 0xE9) as self-synchronising records (pc_report);
 * sleeps arm the local APIC timer (one-shot, 1 ns ticks, set up by
 * the boot stub) and halt until it fires.
 *
 * Prefill writes generation 1 into every page of the vCPU's share before the loop starts,
 * exactly what the reference VMM's host-side prefill stores, for VMMs that cannot prefill.
 *
 * Frugal on purpose: guest instructions cost ~0.6 us each where KVM emulates them.
 */
        .intel_syntax noprefix
        .code64
        .text
        .globl _start

        .equ PORT_HEARTBEAT, 0xF0
        .equ PORT_FAILURE,   0xF1
        .equ PORT_STATUS,    0xF2
        .equ PORT_SLEEP,     0xF3
        .equ PORT_DEBUGCON,  0xE9
        .equ NARGS,          6
        .equ NARGS_PACED,    8
        .equ FLAG_FULL,      1
        .equ FLAG_PC,        2
        .equ FLAG_PREFILL,   4
        .equ APIC_TIMER_COUNT, 0xFEE00380
        .equ STATUS_BAD_ARGS, 0xBAD0A465

/* REPORT port: eax = value to the port, directly or, in PC mode, as a debug-console record.
 * Preserves every register. */
        .macro REPORT port
        test    byte ptr [r8 + 16], FLAG_PC
        jnz     88f
        out     \port, eax
        jmp     89f
88:     push    rdx
        mov     edx, \port
        call    pc_report
        pop     rdx
89:
        .endm

_start:
        cmp     r9, NARGS
        jb      bad_args
        cmp     qword ptr [r8 + 24], 0
        je      bad_args
        mov     r10, rdi                /* vCPU index */
        mov     r11, rsi                /* vCPU count */

        /* Layout: [table | data], the table holding one u32 generation per usable page. */
        add     rcx, 4095
        and     rcx, -4096
        mov     rbx, rcx                /* rbx = generation table */
        mov     rax, rdx
        sub     rax, rcx
        shr     rax, 12                 /* rax = pages after the program */
        lea     rcx, [rax + 1023]
        shr     rcx, 10                 /* rcx = table pages */
        sub     rax, rcx                /* rax = usable pages */
        shl     rcx, 12
        lea     rbp, [rbx + rcx]        /* rbp = first data page */

        mul     qword ptr [r8]
        mov     rcx, 1000
        div     rcx
        mov     rdi, rax                /* rdi = working-set pages */

        mul     r10
        div     r11
        mov     r12, rax                /* r12 = first page of this vCPU's share */
        mov     rax, rdi
        lea     rcx, [r10 + 1]
        mul     rcx
        div     r11
        sub     rax, r12
        mov     r13, rax                /* r13 = pages in this vCPU's share */

        lea     rax, [r10 + 1]
        mov     rcx, 0x9E3779B97F4A7C15
        mul     rcx
        xor     rax, [r8 + 40]
        jnz     1f
        inc     rax
1:      mov     r15, rax                /* r15 = xorshift64 state, never zero */

        /* Pacing state on this vCPU's stack: [rsp] = the running batch's deadline (TSC),
         * [rsp + 8] = TSC ticks per batch, 0 when unpaced. */
        sub     rsp, 16
        mov     qword ptr [rsp + 8], 0
        cmp     r9, NARGS_PACED
        jb      1f
        mov     rcx, [r8 + 48]
        test    rcx, rcx
        jz      1f
        mov     rax, [r8 + 56]
        test    rax, rax
        jz      bad_args
        imul    rax, [r8 + 24]          /* ticks per ms * iterations per batch */
        imul    rax, rax, 1000
        xor     edx, edx
        div     rcx                     /* / iterations per second */
        test    rax, rax
        jnz     2f
        inc     rax
2:      mov     [rsp + 8], rax
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        mov     [rsp], rax
1:
        xor     r14d, r14d              /* r14 = iterations */
        xor     r11d, r11d              /* r11 = sweep cursor */
        xor     r10d, r10d              /* r10 = completed sweeps */
        mov     r9, [r8 + 24]           /* r9  = iterations to the next heartbeat */
        test    r13, r13
        jz      no_pages
        test    byte ptr [r8 + 16], FLAG_PREFILL
        jz      main_loop
        xor     edx, edx
prefill_loop:                           /* generation 0 -> 1 on every page of the share */
        push    rdx
        add     rdx, r12
        mov     ecx, [rbx + rdx * 4]
        test    ecx, ecx
        jnz     1f
        mov     rsi, rdx
        shl     rsi, 12
        add     rsi, rbp
        call    write_page
1:      pop     rdx
        inc     rdx
        cmp     rdx, r13
        jb      prefill_loop

main_loop:
        mov     rax, r15                /* xorshift64 */
        shl     rax, 13
        xor     r15, rax
        mov     rax, r15
        shr     rax, 7
        xor     r15, rax
        mov     rax, r15
        shl     rax, 17
        xor     r15, rax

        mov     rax, r15                /* page = start + (rand * count) >> 64 */
        mul     r13
        add     rdx, r12
        call    verify_page
        mov     rax, r15
        shr     rax, 20
        and     eax, 1023
        cmp     rax, [r8 + 8]
        jae     2f
        call    write_page

2:      lea     rdx, [r12 + r11]        /* the sweep's page */
        call    verify_page
        inc     r11
        cmp     r11, r13
        jb      3f
        xor     r11d, r11d
        inc     r10
        mov     eax, r10d
        REPORT  PORT_STATUS

3:      inc     r14
        dec     r9
        jnz     main_loop
        mov     r9, [r8 + 24]
        mov     eax, r14d
        REPORT  PORT_HEARTBEAT
        cmp     qword ptr [rsp + 8], 0
        jne     pace
        mov     rax, [r8 + 32]
        test    rax, rax
        jz      main_loop
        call    sleep
        jmp     main_loop

/* The batch just done had a deadline: sleep until it, or, more than a batch off schedule
 * either way, start the schedule afresh from now. */
pace:
        rdtsc
        shl     rdx, 32
        or      rax, rdx                /* now */
        mov     rdx, [rsp]
        add     rdx, [rsp + 8]
        mov     [rsp], rdx              /* this batch's deadline */
        sub     rdx, rax
        jl      4f
        cmp     rdx, [rsp + 8]
        ja      5f
        mov     rax, rdx                /* ahead: sleep the difference, in microseconds */
        imul    rax, rax, 1000
        xor     edx, edx
        div     qword ptr [r8 + 56]
        test    eax, eax
        jz      main_loop
        call    sleep
        jmp     main_loop
4:      neg     rdx                     /* late */
        cmp     rdx, [rsp + 8]
        jbe     main_loop
5:      mov     [rsp], rax
        jmp     main_loop

/* sleep: eax = microseconds (at most 1 s). Preserves every register. */
sleep:
        test    byte ptr [r8 + 16], FLAG_PC
        jnz     1f
        out     PORT_SLEEP, eax
        ret
1:      push    rax
        push    rdi
        mov     eax, eax
        imul    rax, rax, 1000          /* the APIC timer counts nanoseconds */
        mov     rdi, APIC_TIMER_COUNT
        mov     [rdi], eax
        sti                             /* the timer's interrupt ends the halt */
        hlt
        cli
        pop     rdi
        pop     rax
        ret

/* pc_report: edx = port, eax = value: one debug-console record. Preserves every register.
 * A record is six bytes: the port's low nibble with the top bit set, then the value in five
 * 7-bit groups, least significant first, top bits clear. A migration can move the guest
 * between two bytes of a record; the reader on the new host skips bytes until a top bit. */
pc_report:
        push    rax
        push    rdx
        push    rcx
        mov     ecx, eax
        mov     eax, edx
        and     al, 0x0F
        or      al, 0x80
        mov     edx, PORT_DEBUGCON
        out     dx, al
        .rept   5
        mov     eax, ecx
        and     al, 0x7F
        out     dx, al
        shr     ecx, 7
        .endr
        pop     rcx
        pop     rdx
        pop     rax
        ret

/* verify_page: rdx = working-set page. Returns rsi = its address, ecx = its generation.
 * Clobbers rax, rdi. On a mismatch, reports the gfn and rewrites the page. */
verify_page:
        mov     ecx, [rbx + rdx * 4]
        mov     rsi, rdx
        shl     rsi, 12
        add     rsi, rbp
        test    ecx, ecx
        jz      verify_zero
        mov     rdi, rsi
        shl     rdi, 20                 /* (address >> 12) << 32 */
        or      rdi, rcx
        test    byte ptr [r8 + 16], FLAG_FULL
        jnz     verify_full
        cmp     [rsi], rdi
        jne     bad_page
        lea     rax, [rdi + 256]
        cmp     [rsi + 2048], rax
        jne     bad_page
        lea     rax, [rdi + 511]
        cmp     [rsi + 4088], rax
        jne     bad_page
        ret
verify_full:
        mov     rax, rdi
        xor     edi, edi
4:      cmp     [rsi + rdi], rax
        jne     bad_page
        inc     rax
        add     rdi, 8
        cmp     rdi, 4096
        jb      4b
        ret
verify_zero:
        test    byte ptr [r8 + 16], FLAG_FULL
        jnz     verify_zero_full
        mov     rax, [rsi]
        or      rax, [rsi + 2048]
        or      rax, [rsi + 4088]
        jnz     bad_page
        ret
verify_zero_full:
        xor     edi, edi
5:      cmp     qword ptr [rsi + rdi], 0
        jne     bad_page
        add     rdi, 8
        cmp     rdi, 4096
        jb      5b
        ret
bad_page:
        mov     rax, rsi
        shr     rax, 12
        REPORT  PORT_FAILURE
        /* fall through: rewrite the page so this corruption is reported once */

/* write_page: rdx = working-set page, rsi = its address, ecx = its generation. */
write_page:
        inc     ecx
        jnz     6f
        inc     ecx                     /* generation 0 means "never written": skip it */
6:      mov     rdi, rsi
        shl     rdi, 20
        or      rdi, rcx
        test    byte ptr [r8 + 16], FLAG_FULL
        jnz     write_full
        mov     [rsi], rdi
        lea     rax, [rdi + 256]
        mov     [rsi + 2048], rax
        lea     rax, [rdi + 511]
        mov     [rsi + 4088], rax
        mov     [rbx + rdx * 4], ecx
        ret
write_full:
        mov     rax, rdi
        xor     edi, edi
7:      mov     [rsi + rdi], rax
        inc     rax
        add     rdi, 8
        cmp     rdi, 4096
        jb      7b
        mov     [rbx + rdx * 4], ecx
        ret

/* A vCPU whose share is empty only shows it is alive. */
no_pages:
        inc     r14
        mov     eax, r14d
        REPORT  PORT_HEARTBEAT
        mov     eax, 1000
        call    sleep
        jmp     no_pages

bad_args:
        mov     eax, STATUS_BAD_ARGS
        REPORT  PORT_STATUS
        hlt
