//! Whether a thread that was running on a core the hypervisor took by force can run on, and
//! from where: the judgment on the registers the hypervisor kept (`FORCED_STATE`), and the
//! interrupt frame that resumes the thread on another core.
//!
//! A forced core stops between any two instructions, so what it ran is resumable only where a
//! timer interrupt could have preempted it and another core run it on: with interrupts enabled
//! (RFLAGS.IF). Every lock in Lavender's kernel masks interrupts (`kernel::sync::IrqMutex`) and
//! the scheduler runs with them off, so code running with IF set holds no lock and is not in
//! the middle of a switch; its state is its registers, its stack and the kernel structures it
//! reached through them, which the rest of the kernel can see. That is true in user mode
//! (always IF: a program cannot clear it at IOPL 0) and for a thread's kernel code with
//! interrupts on (a system call that waits or copies). With IF clear the core may hold a lock
//! no one will release, or be half-way through a switch: nothing it ran can be trusted, and
//! the thread is lost. Only the general-purpose registers, RIP, RFLAGS, RSP and the selectors
//! come back: Lavender's kernel and programs are built without SSE (`x86_64-unknown-none`), so
//! there is no extended state of theirs to lose, and the per-core registers (CR3, the kernel
//! stack in the TSS, GS) are set by the scheduler on the core that resumes the thread.

use core::fmt;

use vmcall_proto::hypercall::ForcedState;

use crate::descriptors::{
    KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR, USER_CODE_SELECTOR, USER_DATA_SELECTOR,
};

/// Words of an interrupt frame as Lavender's interrupt path pushes it (the processor's five,
/// the vector and error code, the fifteen general-purpose registers: `kernel::arch::idt`).
pub const FRAME_WORDS: usize = 22;

/// Why a thread running on a forced core cannot be resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// The hypervisor kept no registers for the core (the read failed).
    NoRegisters,
    /// The core ran with interrupts off: in the kernel, maybe holding a lock or switching.
    InterruptsOff,
    /// Selectors that are not Lavender's for that privilege level, or user mode for a
    /// kernel thread.
    Segments,
    /// In the kernel on a stack that is not the thread's own (or with no room below RSP).
    StackOutside,
}

impl Lost {
    pub fn name(self) -> &'static str {
        match self {
            Self::NoRegisters => "no_registers",
            Self::InterruptsOff => "interrupts_off",
            Self::Segments => "segments",
            Self::StackOutside => "stack_outside",
        }
    }
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The thread that ran on the forced core, as the scheduler knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thread {
    /// Its kernel stack: lowest usable address (above the canary) and top.
    pub stack_bottom: u64,
    pub stack_top: u64,
    /// Whether it belongs to a process (may run in user mode).
    pub user: bool,
}

/// Where and how to resume: the frame to write just below `frame_top` on the thread's stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub to_user: bool,
    /// The frame ends here: the kernel stack's top for user mode (the thread has nothing on
    /// its kernel stack there), the forced RSP for kernel mode (Lavender's kernel has no red
    /// zone, so nothing lives below RSP).
    pub frame_top: u64,
    pub frame: [u64; FRAME_WORDS],
}

impl Resume {
    /// Where the thread goes on.
    pub fn rip(&self) -> u64 {
        self.frame[17]
    }
}

/// RFLAGS bits a resumed thread keeps: the arithmetic flags and DF (SDM Vol. 1 §3.4.3); IF and
/// the always-set bit 1 are added. IOPL, TF and the system flags are never taken from outside.
const KEPT_FLAGS: u64 = 0xcd5;
const RFLAGS_FIXED: u64 = 0x2;
const RFLAGS_IF: u64 = 1 << 9;

/// Judges the registers `state` of `thread`, which was running on the forced core; `below`
/// is how many bytes the caller puts below the frame on a kernel stack (its switch frame).
pub fn judge(state: &ForcedState, thread: Thread, below: u64) -> Result<Resume, Lost> {
    if !state.interrupts_enabled() {
        return Err(Lost::InterruptsOff);
    }
    let (to_user, code, data) = match state.cpl() {
        3 if thread.user => (true, USER_CODE_SELECTOR, USER_DATA_SELECTOR),
        0 => (false, KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR),
        _ => return Err(Lost::Segments),
    };
    // In 64-bit mode an interrupt taken in user mode leaves the kernel a null SS (SDM Vol. 3A
    // §6.14.4), so the kernel runs with either.
    let ss_ok = state.ss == u64::from(data) || (!to_user && state.ss == 0);
    if state.cs != u64::from(code) || !ss_ok {
        return Err(Lost::Segments);
    }
    let frame_top = if to_user {
        thread.stack_top
    } else {
        let needed = (FRAME_WORDS as u64) * 8 + below;
        let room = state
            .rsp
            .checked_sub(needed)
            .is_some_and(|low| low >= thread.stack_bottom);
        if !room || state.rsp > thread.stack_top || state.rsp % 8 != 0 {
            return Err(Lost::StackOutside);
        }
        state.rsp
    };
    Ok(Resume {
        to_user,
        frame_top,
        frame: frame(state, code, data),
    })
}

/// The frame, lowest address first: R15 .. RAX, vector and error code (0), then RIP, CS,
/// RFLAGS, RSP, SS for `IRETQ` (SDM Vol. 3A §6.14.1).
fn frame(s: &ForcedState, code: u16, data: u16) -> [u64; FRAME_WORDS] {
    let rflags = (s.rflags & KEPT_FLAGS) | RFLAGS_FIXED | RFLAGS_IF;
    [
        s.r15,
        s.r14,
        s.r13,
        s.r12,
        s.r11,
        s.r10,
        s.r9,
        s.r8,
        s.rbp,
        s.rdi,
        s.rsi,
        s.rdx,
        s.rcx,
        s.rbx,
        s.rax,
        0,
        0,
        s.rip,
        u64::from(code),
        rflags,
        s.rsp,
        u64::from(data),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const STACK: Thread = Thread {
        stack_bottom: 0x10_0010,
        stack_top: 0x10_8000,
        user: true,
    };

    fn user_state() -> ForcedState {
        ForcedState {
            rax: 1,
            r15: 15,
            rip: 0x80_0000_1234,
            rsp: 0x80_0100_0000,
            rflags: 0x246,
            cs: USER_CODE_SELECTOR.into(),
            ss: USER_DATA_SELECTOR.into(),
            ..ForcedState::default()
        }
    }

    #[test]
    fn a_user_thread_resumes_from_its_kernel_stack_top() {
        let resume = judge(&user_state(), STACK, 64).unwrap();
        assert!(resume.to_user);
        assert_eq!(resume.frame_top, STACK.stack_top);
        assert_eq!(resume.frame[0], 15, "R15 first");
        assert_eq!(resume.frame[14], 1, "RAX last of the registers");
        assert_eq!(
            resume.frame[17..],
            [
                0x80_0000_1234,
                u64::from(USER_CODE_SELECTOR),
                0x246,
                0x80_0100_0000,
                u64::from(USER_DATA_SELECTOR)
            ]
        );
    }

    #[test]
    fn interrupts_off_is_lost_whatever_else() {
        let state = ForcedState {
            rflags: 0x46,
            ..user_state()
        };
        assert_eq!(judge(&state, STACK, 64), Err(Lost::InterruptsOff));
        let kernel = ForcedState {
            cs: KERNEL_CODE_SELECTOR.into(),
            ss: KERNEL_DATA_SELECTOR.into(),
            rsp: 0x10_7000,
            rflags: 0x86,
            ..user_state()
        };
        assert_eq!(judge(&kernel, STACK, 64), Err(Lost::InterruptsOff));
    }

    #[test]
    fn kernel_code_with_interrupts_on_resumes_below_its_rsp_on_its_own_stack() {
        let kernel = ForcedState {
            cs: KERNEL_CODE_SELECTOR.into(),
            ss: KERNEL_DATA_SELECTOR.into(),
            rsp: 0x10_7000,
            ..user_state()
        };
        let resume = judge(&kernel, STACK, 64).unwrap();
        assert!(!resume.to_user);
        assert_eq!(
            judge(&ForcedState { ss: 0, ..kernel }, STACK, 64),
            Ok(resume)
        );
        assert_eq!(resume.frame_top, 0x10_7000);
        assert_eq!(resume.frame[18], u64::from(KERNEL_CODE_SELECTOR));
        // Off the thread's stack (another stack, or user RSP on the way out of a call).
        for rsp in [
            0x80_0100_0000,
            0x10_8008,
            0x10_0000,
            0x10_0010 + 8 * 22,
            0x10_7004,
        ] {
            let state = ForcedState { rsp, ..kernel };
            assert_eq!(
                judge(&state, STACK, 64),
                Err(Lost::StackOutside),
                "{rsp:#x}"
            );
        }
    }

    #[test]
    fn foreign_selectors_and_user_mode_of_a_kernel_thread_are_refused() {
        let kernel_thread = Thread {
            user: false,
            ..STACK
        };
        assert_eq!(judge(&user_state(), kernel_thread, 64), Err(Lost::Segments));
        for (cs, ss) in [(0x33, 0x2b), (0x08 | 1, 0x10), (0x1b, 0x23), (0x23, 0)] {
            let state = ForcedState {
                cs,
                ss,
                ..user_state()
            };
            assert_eq!(judge(&state, STACK, 64), Err(Lost::Segments), "{cs:#x}");
        }
    }

    #[test]
    fn only_arithmetic_flags_come_back() {
        // IOPL 3, TF, NT, AC and VM set, IF clear... but IF clear is refused first, so set it.
        let state = ForcedState {
            rflags: 0x3_7f00 | 0x3000 | 0x200 | 0xcd5,
            ..user_state()
        };
        let resume = judge(&state, STACK, 64).unwrap();
        assert_eq!(resume.frame[19], 0xcd5 | 0x2 | 0x200);
    }
}
