//! The hypervisor's own descriptor tables: one GDT with a TSS per core (VM exits load
//! the host TR, and the VMCS host TR selector must not be null, Intel SDM Vol. 3C
//! §28.2.3), and one IDT shared by all cores whose handlers report an exception in the
//! hypervisor with its frame and stop that core instead of triple-faulting.

use core::cell::UnsafeCell;
use core::mem::size_of;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::platform::MAX_CPUS;

/// Selectors in every core's GDT.
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// 64-bit TSS (SDM Vol. 3A §8.7, Figure 8-11). The hypervisor uses no IST or ring
/// change, so only its presence matters; 104 bytes.
#[repr(C, packed)]
struct TaskStateSegment {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    io_map_base: u16,
}
const _: () = assert!(size_of::<TaskStateSegment>() == 104);

/// Null, code, data, then the 16-byte TSS descriptor.
#[repr(C, align(16))]
struct Gdt([u64; 5]);

struct PerCpuTables {
    gdt: Gdt,
    tss: TaskStateSegment,
}

struct TableArea(UnsafeCell<[PerCpuTables; MAX_CPUS]>);
// SAFETY: each core initializes and loads only its own element (`load_for_cpu` is
// guarded by a per-index flag); afterwards the CPU reads them, Rust code does not.
unsafe impl Sync for TableArea {}

static TABLES: TableArea = TableArea(UnsafeCell::new(
    [const {
        PerCpuTables {
            gdt: Gdt([0; 5]),
            tss: TaskStateSegment {
                reserved0: 0,
                rsp: [0; 3],
                reserved1: 0,
                ist: [0; 7],
                reserved2: 0,
                reserved3: 0,
                // No I/O permission bitmap: the offset points past the segment limit.
                io_map_base: size_of::<TaskStateSegment>() as u16,
            },
        }
    }; MAX_CPUS],
));
static LOADED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// Base addresses of this core's tables, for the VMCS host-state area. Only
/// [`load_for_cpu`] makes one, so its addresses are always loaded, static tables.
#[derive(Clone, Copy, Debug)]
pub struct HostTables {
    pub(super) gdt_base: u64,
    pub(super) tss_base: u64,
    pub(super) idt_base: u64,
}

/// Builds and loads the GDT, TSS and IDT of CPU `index`. Called once per core, on it.
pub fn load_for_cpu(index: usize) -> HostTables {
    assert!(index < MAX_CPUS && !LOADED[index].swap(true, Ordering::AcqRel));
    // SAFETY: the flag above makes this the only access to element `index`, and no other
    // core touches it; the pointer is in bounds of the static array.
    let tables = unsafe { &mut (*TABLES.0.get())[index] };
    let tss_base = &raw const tables.tss as u64;
    let tss_limit = (size_of::<TaskStateSegment>() - 1) as u64;
    tables.gdt.0 = [
        0,
        0x00af_9a00_0000_ffff, // 64-bit code, DPL 0
        0x00cf_9200_0000_ffff, // data, DPL 0
        // Available 64-bit TSS (type 9), present (SDM Vol. 3A §8.2.3, Figure 8-4).
        (tss_limit & 0xffff)
            | ((tss_base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((tss_base >> 24) & 0xff) << 56),
        tss_base >> 32,
    ];
    let gdt_base = &raw const tables.gdt as u64;
    let idt_base = idt::install_shared();
    // SAFETY: the GDT lives in a static (never moves), its code/data descriptors match the
    // selectors in use, so reloading CS/SS/DS and TR keeps execution on the same flat
    // segments; the TSS descriptor was just written and is not busy (loaded only here).
    unsafe {
        let pointer = DescriptorPointer {
            limit: (size_of::<Gdt>() - 1) as u16,
            base: gdt_base,
        };
        core::arch::asm!(
            "lgdt [{gdt}]",
            "push {code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ss, {data:x}",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "ltr {tss:x}",
            gdt = in(reg) &pointer,
            code = in(reg) u64::from(KERNEL_CODE_SELECTOR),
            data = in(reg) u64::from(KERNEL_DATA_SELECTOR),
            tss = in(reg) u64::from(TSS_SELECTOR),
            tmp = out(reg) _,
        );
    }
    HostTables {
        gdt_base,
        tss_base,
        idt_base,
    }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Vector of the IPI and timer that wake the monitor's own core (see `wait_for_wakeup`).
pub const WAKE_VECTOR: u8 = 0xf0;
/// Vector of the IPI that wakes a parked core to read its mailbox (`vcpu::mailbox`). Its
/// stub leaves it in service: the core ends it itself, once it knows the IPI came.
pub const MAILBOX_VECTOR: u8 = 0xf1;
/// Spurious-interrupt vector programmed in the APIC (SDM Vol. 3A §11.9).
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Sleeps until an interrupt (the wake IPI) arrives. STI's one-instruction interrupt
/// shadow makes `sti; hlt` atomic: a wake-up sent before the HLT is not lost
/// (SDM Vol. 2B, STI).
pub fn wait_for_wakeup() {
    // SAFETY: the only interrupts the hypervisor's cores receive are the wake IPI and
    // spurious ones, whose handlers below just acknowledge and return.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// Lets one pending interrupt in (the hypervisor's handlers acknowledge it and return), for
/// a core clearing what a guest left pending in its APIC.
pub fn take_pending_interrupt() {
    // SAFETY: as in `wait_for_wakeup`: every interrupt vector (16 up) returns at once; STI's
    // shadow lets the interrupt in after the NOP.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// The IDT: exception vectors 0..31 report and stop the core; every other vector (the
/// wake IPI, interrupts a guest left behind, spurious ones) returns at once, the mailbox IPI
/// left in service (see `MAILBOX_VECTOR`). Vectors 16..31
/// are also legal interrupt vectors (the local APIC refuses only 0..15, SDM Vol. 3A §11.5.3),
/// which a guest can leave pending on its core through registers that pass through (the
/// self-IPI register, an LVT entry): such an interrupt is acknowledged and dropped too, told
/// from an exception by its in-service bit (set by the APIC when it delivers the vector,
/// never by an exception).
mod idt {
    use super::*;

    #[repr(C, align(16))]
    struct Idt([[u64; 2]; 256]);

    struct IdtArea(UnsafeCell<Idt>);
    // SAFETY: written once, by the first core to call `install_shared`, before any core
    // loads it (the `Once`); read-only afterwards.
    unsafe impl Sync for IdtArea {}
    static IDT: IdtArea = IdtArea(UnsafeCell::new(Idt([[0; 2]; 256])));
    static BUILT: spin::Once<()> = spin::Once::new();

    extern "C" {
        /// 32 entry stubs, 16 bytes apart, emitted by the assembly below.
        static host_exception_stubs: u8;
        /// 16 stubs for vectors 16..31, 16 bytes apart: an interrupt or an exception.
        static host_low_vector_stubs: u8;
        static host_wake_stub: u8;
        static host_mailbox_stub: u8;
        static host_spurious_stub: u8;
        static host_nmi_stub: u8;
    }

    /// A 64-bit interrupt gate, present, DPL 0 (SDM Vol. 3A §7.14.1, Figure 7-8).
    fn gate(handler: u64) -> [u64; 2] {
        [
            (handler & 0xffff)
                | (u64::from(KERNEL_CODE_SELECTOR) << 16)
                | (0x8e << 40)
                | (((handler >> 16) & 0xffff) << 48),
            handler >> 32,
        ]
    }

    /// Builds the IDT once and loads it on this core; returns its base.
    pub(super) fn install_shared() -> u64 {
        BUILT.call_once(|| {
            let stubs = &raw const host_exception_stubs as u64;
            // SAFETY: first and only writer (inside `call_once`); no core has loaded it yet.
            let idt = unsafe { &mut *IDT.0.get() };
            for (vector, entry) in idt.0.iter_mut().take(16).enumerate() {
                *entry = gate(stubs + 16 * vector as u64);
            }
            let low_vector_stubs = &raw const host_low_vector_stubs as u64;
            for (index, entry) in idt.0[16..32].iter_mut().enumerate() {
                *entry = gate(low_vector_stubs + 16 * index as u64);
            }
            // The wake IPI, and any interrupt a guest left pending on a core it no longer
            // runs on (its timer, its IPIs): acknowledge and return.
            for entry in idt.0.iter_mut().skip(32) {
                *entry = gate(&raw const host_wake_stub as u64);
            }
            // An NMI meant to make a guest exit can reach a core that has just parked.
            idt.0[2] = gate(&raw const host_nmi_stub as u64);
            idt.0[usize::from(MAILBOX_VECTOR)] = gate(&raw const host_mailbox_stub as u64);
            idt.0[usize::from(SPURIOUS_VECTOR)] = gate(&raw const host_spurious_stub as u64);
        });
        let base = IDT.0.get() as u64;
        let pointer = DescriptorPointer {
            limit: (size_of::<Idt>() - 1) as u16,
            base,
        };
        // SAFETY: the IDT is a fully built static whose gates point at the stubs below.
        unsafe { core::arch::asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack)) };
        base
    }

    /// What the stubs push (plus the CPU's frame): see `host_exception_common`.
    #[repr(C)]
    pub struct ExceptionFrame {
        pub vector: u64,
        pub error_code: u64,
        pub rip: u64,
        pub cs: u64,
        pub rflags: u64,
        pub rsp: u64,
        pub ss: u64,
    }

    #[no_mangle]
    extern "C" fn host_exception(frame: &ExceptionFrame) -> ! {
        let cr2: u64;
        // SAFETY: reading CR2 has no side effects.
        unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
        crate::console::report_host_exception(
            frame.vector,
            frame.error_code,
            frame.rip,
            frame.rsp,
            cr2,
        );
        super::super::cpu::halt_forever()
    }

    // Vectors that push an error code (SDM Vol. 3A §7.3, Table 7-1): 8, 10-14, 17, 21, 29, 30.
    // Each stub is padded to 16 bytes so the IDT builder can compute its address.
    core::arch::global_asm!(
        r#"
        .section .text.host_exceptions, "ax"
        .balign 16
        .global host_exception_stubs
    host_exception_stubs:
        .irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .balign 16
        .if (\vector == 8) || (\vector >= 10 && \vector <= 14) || (\vector == 17) || (\vector == 21) || (\vector == 29) || (\vector == 30)
        push \vector
        .else
        push 0
        push \vector
        .endif
        jmp host_exception_common
        .endr

    host_exception_common:
        mov rdi, rsp
        and rsp, -16
        call host_exception
        ud2

        /* Vectors 16..31: `push vector` only, since an interrupt pushes no error code. */
        .balign 16
        .global host_low_vector_stubs
    host_low_vector_stubs:
        .irp vector, 16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .balign 16
        push \vector
        jmp host_low_vector
        .endr

        /* An interrupt has the vector's bit set in the in-service register (x2APIC MSR 0x810
           holds vectors 0..31): acknowledge it (EOI) and return. Anything else is an
           exception: on to its exception stub, which reports it (RAX and RCX are lost, the
           core stops). */
    host_low_vector:
        push rax
        push rcx
        push rdx
        mov ecx, 0x810
        rdmsr
        mov ecx, [rsp + 24]
        bt eax, ecx
        jnc 2f
        mov ecx, 0x80b
        xor eax, eax
        xor edx, edx
        wrmsr
        pop rdx
        pop rcx
        pop rax
        add rsp, 8
        iretq
    2:
        mov rax, [rsp + 24]
        shl rax, 4
        lea rcx, [rip + host_exception_stubs]
        add rax, rcx
        pop rdx
        pop rcx
        add rsp, 16
        jmp rax

        /* Wake IPI: acknowledge it (x2APIC EOI, MSR 0x80b) and return. The hypervisor
           requires x2APIC on cores that run guests. */
        .global host_wake_stub
    host_wake_stub:
        push rax
        push rcx
        push rdx
        mov ecx, 0x80b
        xor eax, eax
        xor edx, edx
        wrmsr
        pop rdx
        pop rcx
        pop rax
        iretq

        /* Spurious interrupts need no EOI (SDM Vol. 3A §11.9); a stray NMI needs nothing; the
           mailbox IPI stays in service until the core that sleeps for it ends it. */
        .global host_spurious_stub
        .global host_nmi_stub
        .global host_mailbox_stub
    host_spurious_stub:
    host_nmi_stub:
    host_mailbox_stub:
        iretq
        .text
    "#
    );
}
