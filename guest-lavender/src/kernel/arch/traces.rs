//! Registers a core keeps across guests unless the hypervisor clears them, for the handover
//! test: the SSE registers, the debug address registers DR0-DR3 and CR2. The kernel is built
//! without SSE, so no Rust value ever lives in an XMM register: writing them here disturbs
//! nothing, and on arrival they still hold whatever the core brought.

use core::arch::asm;

use x86_64::registers::control::{Cr4, Cr4Flags};

/// What a core holds on arrival (the low 64 bits of each XMM register).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registers {
    pub xmm: [u64; 16],
    pub dr: [u64; 4],
    pub cr2: u64,
}

/// SSE instructions raise #UD unless CR4.OSFXSR is set (Intel SDM Vol. 3A §2.5).
fn enable_sse() {
    // SAFETY: OSFXSR only allows FXSAVE/FXRSTOR and SSE instructions; nothing else changes.
    unsafe { Cr4::update(|flags| flags.insert(Cr4Flags::OSFXSR)) };
}

/// Writes `secret` (plus the register number) into XMM0-15, DR0-3 and CR2.
pub fn leave(secret: u64) {
    enable_sse();
    // SAFETY: the kernel keeps no value in XMM registers (built without SSE); DR0-3 only hold
    // breakpoint addresses, which stay disabled (DR7 untouched); CR2 is only read by the
    // page-fault handler, and this core faults no more before it leaves.
    unsafe {
        asm!(
            "movq xmm0, {s}", "inc {s}", "movq xmm1, {s}", "inc {s}", "movq xmm2, {s}", "inc {s}",
            "movq xmm3, {s}", "inc {s}", "movq xmm4, {s}", "inc {s}", "movq xmm5, {s}", "inc {s}",
            "movq xmm6, {s}", "inc {s}", "movq xmm7, {s}", "inc {s}", "movq xmm8, {s}", "inc {s}",
            "movq xmm9, {s}", "inc {s}", "movq xmm10, {s}", "inc {s}", "movq xmm11, {s}", "inc {s}",
            "movq xmm12, {s}", "inc {s}", "movq xmm13, {s}", "inc {s}", "movq xmm14, {s}", "inc {s}",
            "movq xmm15, {s}", "inc {s}",
            "mov dr0, {s}", "inc {s}", "mov dr1, {s}", "inc {s}", "mov dr2, {s}", "inc {s}",
            "mov dr3, {s}", "inc {s}", "mov cr2, {s}",
            s = inout(reg) secret => _,
            options(nomem, nostack),
        );
    }
}

/// Reads XMM0-15 (low halves), DR0-3 and CR2.
pub fn read() -> Registers {
    enable_sse();
    let mut r = Registers::default();
    let x = &mut r.xmm;
    // SAFETY: reading XMM, debug and control registers has no side effect; the results go to
    // general registers bound to locals.
    unsafe {
        asm!("movq {}, xmm0", "movq {}, xmm1", "movq {}, xmm2", "movq {}, xmm3",
            out(reg) x[0], out(reg) x[1], out(reg) x[2], out(reg) x[3], options(nomem, nostack));
        asm!("movq {}, xmm4", "movq {}, xmm5", "movq {}, xmm6", "movq {}, xmm7",
            out(reg) x[4], out(reg) x[5], out(reg) x[6], out(reg) x[7], options(nomem, nostack));
        asm!("movq {}, xmm8", "movq {}, xmm9", "movq {}, xmm10", "movq {}, xmm11",
            out(reg) x[8], out(reg) x[9], out(reg) x[10], out(reg) x[11], options(nomem, nostack));
        asm!("movq {}, xmm12", "movq {}, xmm13", "movq {}, xmm14", "movq {}, xmm15",
            out(reg) x[12], out(reg) x[13], out(reg) x[14], out(reg) x[15], options(nomem, nostack));
        asm!("mov {}, dr0", "mov {}, dr1", "mov {}, dr2", "mov {}, dr3",
            out(reg) r.dr[0], out(reg) r.dr[1], out(reg) r.dr[2], out(reg) r.dr[3],
            options(nomem, nostack));
        asm!("mov {}, cr2", out(reg) r.cr2, options(nomem, nostack));
    }
    r
}
