//! Kernel entry, the minimal ring-0 set-up, and the drop to ring 3.
//!
//! Everything ring 0 needs is static data assembled at link time (page tables
//! with the user bit, a GDT with user segments, one TSS per CPU with an I/O
//! permission bitmap that grants every paravirtual port), so the ring-0 path
//! from `_start` to `iretq` is a few dozen instructions: on a PVM host, where
//! ring-0 code is emulated at about 1 us per instruction, that is ~40 us. The
//! only ring-0 work at run time is pointing this CPU's TSS descriptor at its
//! TSS and its ring-0 stack (the descriptor splits the base address in
//! fields, which the assembler cannot do with a relocation).
//!
//! The IDT is loaded here but filled from ring 3 by [`super::idt::init`]
//! (it is ordinary memory, mapped writable): an exception before that
//! triple-faults, which the VMM reports.
//!
//! The boot CPU enters at `_start` (Linux 64-bit boot protocol: long mode,
//! `RSI` = `boot_params`), or, from a VMM that reads the image's ring-3
//! entry note (`guest_abi::entry_note`, emitted below), at `_start_ring3`
//! already in ring 3 with the state the prologue would have set up, so that
//! it runs no ring-0 instruction at all; application processors enter at
//! `ap_start` with `RDI` = CPU index and `RSP` = their stack (see
//! `guest_abi::ApBoot`).

use core::arch::global_asm;

/// Most CPUs the kernel supports.
pub const MAX_CPUS: usize = 32;
/// Ring-3 (kernel) stack of the boot CPU.
pub const BOOT_STACK_SIZE: usize = 64 << 10;
/// Ring-3 (kernel) stack of each application processor.
pub const AP_STACK_SIZE: usize = 32 << 10;
/// Ring-0 stack of each CPU: only exception and gate entries run on it (and
/// the whole kernel when it runs in ring 0).
pub const RING0_STACK_SIZE: usize = 64 << 10;
/// Bytes per TSS: 104-byte TSS, an I/O bitmap covering ports below
/// `guest_abi::IO_BITMAP_PORTS`, its 0xff terminator, padding to 16.
pub const TSS_STRIDE: usize = 304;
const TSS_LIMIT: usize = 104 + guest_abi::IO_BITMAP_PORTS as usize / 8;
const _: () = assert!(TSS_LIMIT < TSS_STRIDE && TSS_STRIDE.is_multiple_of(16));

/// Selectors of the GDT below.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User data selector, RPL 3.
pub const USER_DS: u16 = 0x18 | 3;
/// User code selector, RPL 3.
pub const USER_CS: u16 = 0x20 | 3;

#[repr(C, align(4096))]
pub struct Stack<const N: usize>(pub [u8; N]);

#[no_mangle]
#[link_section = ".noinit.stacks"]
static mut BOOT_STACK: Stack<BOOT_STACK_SIZE> = Stack([0; BOOT_STACK_SIZE]);
#[no_mangle]
#[link_section = ".noinit.stacks"]
static mut RING0_STACKS: Stack<{ RING0_STACK_SIZE * MAX_CPUS }> =
    Stack([0; RING0_STACK_SIZE * MAX_CPUS]);
/// Ring-3 stacks of the application processors (CPU `i` >= 1 uses slot `i - 1`).
#[no_mangle]
#[link_section = ".noinit.stacks"]
pub static mut AP_STACKS: Stack<{ AP_STACK_SIZE * (MAX_CPUS - 1) }> =
    Stack([0; AP_STACK_SIZE * (MAX_CPUS - 1)]);

extern "C" {
    /// The boot CPU's top-level page table (static, identity maps the first GiB).
    pub static PML4: [u64; 512];
    /// The page-directory-pointer table under `PML4[0]` (512 GiB).
    pub static PDPT: [u64; 512];
    /// First and last byte (exclusive) of the loaded kernel, from the linker script.
    pub static __kernel_start: u8;
    pub static __kernel_end: u8;
    /// Entry of the application processors.
    pub fn ap_start() -> !;
}

global_asm!(
    r#"
    .section .text.entry, "ax"
    .code64
    .global _start
_start:
    cli
    mov r15, rsi                    // boot_params
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r14, rax                    // TSC at entry
    xor edi, edi                    // CPU 0
    lea rsp, [rip + BOOT_STACK + {boot_stack}]
    jmp 2f

    .global ap_start
ap_start:                           // RDI = CPU index, RSP = its stack
    cli
    xor r15d, r15d
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r14, rax

2:  lgdt [rip + GDT_PTR]
    // This CPU's TSS and the top of its ring-0 stack.
    imul rax, rdi, {tss_stride}
    lea rbx, [rip + TSS_ARRAY]
    add rax, rbx
    lea rcx, [rdi + 1]
    imul rcx, rcx, {r0_size}
    lea rbx, [rip + RING0_STACKS]
    add rcx, rbx
    mov [rax + 4], rcx              // TSS.RSP0
    // Its 16-byte descriptor at GDT + 0x28 + 16 * cpu.
    mov rbx, rdi
    shl rbx, 4
    lea rdx, [rip + GDT]
    lea rbx, [rbx + rdx + 0x28]
    mov word ptr [rbx], {tss_limit}
    mov [rbx + 2], ax
    mov rcx, rax
    shr rcx, 16
    mov [rbx + 4], cl
    mov byte ptr [rbx + 5], 0x89    // present, available 64-bit TSS
    mov byte ptr [rbx + 6], 0
    mov [rbx + 7], ch
    shr rax, 32
    mov [rbx + 8], eax
    mov dword ptr [rbx + 12], 0
    mov rax, rdi
    shl rax, 4
    add rax, 0x28
    ltr ax
    mov ax, {kds}
    mov ds, ax
    mov es, ax
    mov ss, ax
    lidt [rip + IDT_PTR]
    lea rax, [rip + PML4]
    mov cr3, rax
    // iretq to ring 3 on the same stack, interrupts off.
    mov rcx, rsp
    push {uds}
    push rcx
    push 0x2
    push {ucs}
    lea rax, [rip + 3f]
    push rax
    iretq

    // Ring-3 entry of the boot CPU, for a VMM that read the MVMGUEST note
    // (guest_abi::entry_note): it set up what the prologue above does, and
    // RSP = top of BOOT_STACK, RSI = boot_params. No ring-0 instruction runs.
    .global _start_ring3
_start_ring3:
    mov r15, rsi                    // boot_params
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r14, rax                    // TSC at entry
    xor edi, edi                    // CPU 0
    mov ecx, 1                      // entered in ring 3
    jmp 4f

3:  // Ring 3. .bss is zero at entry (fresh guest RAM past p_filesz; see
    // docs/boot-protocol.md): clearing it would make the host back every
    // .bss page at every boot.
    xor ecx, ecx                    // entered through the ring-0 prologue
4:  mov rdi, rdi                    // cpu
    mov rsi, r15                    // boot_params (0 on APs)
    mov rdx, r14                    // TSC at entry
    and rsp, -16
    call kernel_entry               // by name: crate::kernel's #[no_mangle] fn
    ud2

    // Static identity map of the first two GiB with 2 MiB pages,
    // user-accessible (the kernel runs in ring 3); the second GiB's page
    // directory is paging::PD1. More is mapped at boot by paging::map_ram.
    // Every entry has its accessed bit (and the 2 MiB pages their dirty bit)
    // set already: a page walk then has nothing to write, so on a
    // shadow-paging host these pages stay the image's shared page-cache
    // pages instead of becoming a private copy in every VM.
    .section .data.pagetables, "aw"
    .balign 4096
    .global PML4
PML4:
    .quad PDPT + 0x27
    .fill 511, 8, 0
    .global PDPT
PDPT:
    .quad PD0 + 0x27
    .quad PD1 + 0x27
    .fill 510, 8, 0
PD0:
    .set i, 0
    .rept 512
    .quad (i << 21) | 0xe7
    .set i, i + 1
    .endr

    .section .data.gdt, "aw"
    .balign 16
GDT:
    .quad 0
    .quad 0x00af9b000000ffff        // 0x08 kernel code, 64-bit
    .quad 0x00cf93000000ffff        // 0x10 kernel data
    .quad 0x00cff3000000ffff        // 0x18 user data, DPL 3
    .quad 0x00affb000000ffff        // 0x20 user code, 64-bit, DPL 3
    .fill {max_cpus} * 2, 8, 0      // 0x28: one TSS descriptor per CPU
GDT_END:
    .balign 8
GDT_PTR:
    .word GDT_END - GDT - 1
    .quad GDT

    // One TSS per CPU; each I/O bitmap is all zeros (every port below
    // IO_BITMAP_PORTS allowed) followed by the 0xff terminator.
    .balign 16
TSS_ARRAY:
    .rept {max_cpus}
    .fill 102, 1, 0
    .word 104
    .fill {bitmap_bytes}, 1, 0
    .byte 0xff
    .fill {tss_pad}, 1, 0
    .endr

    .balign 8
    .global IDT_PTR
IDT_PTR:
    .word 256 * 16 - 1
    .quad IDT

    // The ring-3 entry note (guest_abi::entry_note): name, then a
    // guest_abi::entry_note::Ring3Entry with what the prologue of `_start`
    // sets up for the boot CPU. Its own output section (linker.ld), so that
    // the linker gives it a PT_NOTE program header.
    .section .note.mvmguest, "a", @note
    .balign 8
    .long 9                         // n_namesz
    .long {note_size}               // n_descsz
    .long {note_type}               // n_type
    .asciz "MVMGUEST"
    .balign 4
    .long {note_magic}
    .long {note_version}
    .long {note_size}
    .word 0x28                      // the boot CPU's TSS descriptor
    .word {ucs}
    .word {uds}
    .word GDT_END - GDT - 1
    .word 256 * 16 - 1
    .word {tss_limit}
    .quad _start_ring3
    .quad BOOT_STACK + {boot_stack}
    .quad PML4
    .quad GDT
    .quad IDT
    .quad TSS_ARRAY
    .quad RING0_STACKS + {r0_size}
    .balign 4
    "#,
    boot_stack = const BOOT_STACK_SIZE,
    tss_stride = const TSS_STRIDE,
    r0_size = const RING0_STACK_SIZE,
    tss_limit = const TSS_LIMIT,
    kds = const KERNEL_DS,
    uds = const USER_DS,
    ucs = const USER_CS,
    max_cpus = const MAX_CPUS,
    bitmap_bytes = const guest_abi::IO_BITMAP_PORTS as usize / 8,
    tss_pad = const TSS_STRIDE - TSS_LIMIT - 1,
    note_size = const guest_abi::entry_note::ENTRY_SIZE,
    note_type = const guest_abi::entry_note::NOTE_TYPE,
    note_magic = const guest_abi::entry_note::ENTRY_MAGIC,
    note_version = const guest_abi::entry_note::ENTRY_VERSION,
);
