//! Lavender's IDT: assembly entry stubs for all 256 vectors, a uniform frame, and the hand-off
//! to the safe handlers: `kernel::trap` for the 32 exceptions, `kernel::interrupts` for the
//! rest (the timer, IPIs, the control channel's notification).
//!
//! Written by hand rather than with `x86_64::structures::idt`: that table cannot address the
//! reserved vectors (15, 22..=27, 31), and its handler types need the unstable `x86-interrupt`
//! ABI; Lavender's own stubs give every vector one frame layout for a single Rust handler.
//!
//! Every stub pushes a zero error code where the processor pushes none, then its vector, then
//! jumps to a common path that saves the general registers, calls the handler with a pointer to
//! the frame, restores the (possibly edited) registers and returns with `IRETQ`.

use guest_lavender::descriptors::{Gate, DOUBLE_FAULT_IST, KERNEL_CODE_SELECTOR, NMI_IST};
use guest_lavender::exceptions::pushes_error_code;
use spin::Once;
use x86_64::instructions::tables::lidt;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

/// Number of exception vectors (0..=31, Intel SDM Vol. 3A §6.3.1); the rest are interrupts.
const EXCEPTION_VECTORS: u64 = 32;
/// Full table: every vector has a stub, so a stray interrupt is reported, not a #NP.
const IDT_ENTRIES: usize = 256;
const NMI: usize = 2;
const DOUBLE_FAULT: usize = 8;

/// What the stubs leave on the stack, lowest address first: the general registers the common
/// path pushed, the stub's vector and error code, then the processor's interrupt frame
/// (SDM Vol. 3A §6.14.2, Figure 6-9: RIP, CS, RFLAGS, RSP, SS).
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// One stub per vector, and the table of their addresses (`lavender_exception_stubs`).
macro_rules! exception_stubs {
    ($($vector:literal)*) => {
        $(
            core::arch::global_asm!(
                ".pushsection .text.exception_stubs, \"ax\"",
                ".p2align 4",
                concat!(".global lavender_exception_stub_", stringify!($vector)),
                concat!("lavender_exception_stub_", stringify!($vector), ":"),
                ".if {pushes_error_code} == 0",
                "    push 0",
                ".endif",
                "    push {vector}",
                "    jmp lavender_exception_common",
                ".popsection",
                vector = const $vector,
                pushes_error_code = const pushes_error_code($vector) as u8,
            );
        )*
        core::arch::global_asm!(
            ".pushsection .rodata.exception_stubs, \"a\"",
            ".p2align 3",
            ".global lavender_exception_stubs",
            "lavender_exception_stubs:",
            $(concat!("    .quad lavender_exception_stub_", stringify!($vector)),)*
            ".popsection",
        );
    };
}

exception_stubs!(
    0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98 99 100 101 102 103 104 105 106 107 108 109 110 111 112 113 114 115 116 117 118 119 120 121 122 123 124 125 126 127 128 129 130 131 132 133 134 135 136 137 138 139 140 141 142 143 144 145 146 147 148 149 150 151 152 153 154 155 156 157 158 159 160 161 162 163 164 165 166 167 168 169 170 171 172 173 174 175 176 177 178 179 180 181 182 183 184 185 186 187 188 189 190 191 192 193 194 195 196 197 198 199 200 201 202 203 204 205 206 207 208 209 210 211 212 213 214 215 216 217 218 219 220 221 222 223 224 225 226 227 228 229 230 231 232 233 234 235 236 237 238 239 240 241 242 243 244 245 246 247 248 249 250 251 252 253 254 255
);

core::arch::global_asm!(
    ".pushsection .text.exception_stubs, \"ax\"",
    ".global lavender_exception_common",
    "lavender_exception_common:",
    // The order builds `ExceptionFrame` from its last field down.
    "    push rax",
    "    push rbx",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push rbp",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    // In 64-bit mode the processor aligns RSP to 16 bytes before pushing its 5-word frame
    // (SDM Vol. 3A §6.14.2); with the error code, the vector and 15 registers that is 22 words,
    // so RSP is 16-byte aligned again here and `call` leaves the handler the alignment the
    // System V ABI expects. DF is cleared as the ABI requires on function entry.
    "    mov rdi, rsp",
    "    cld",
    "    call lavender_exception_entry",
    // A thread resumed from a forced core's registers also returns from here
    // (`context::Context::prepare_resume`), with a frame of the same layout.
    ".global lavender_exception_return",
    "lavender_exception_return:",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop r11",
    "    pop r10",
    "    pop r9",
    "    pop r8",
    "    pop rbp",
    "    pop rdi",
    "    pop rsi",
    "    pop rdx",
    "    pop rcx",
    "    pop rbx",
    "    pop rax",
    // Drop the vector and the error code; IRETQ pops the processor's frame.
    "    add rsp, 16",
    "    iretq",
    ".popsection",
);

extern "C" {
    /// Addresses of the stubs, by vector (defined by `exception_stubs!`).
    static lavender_exception_stubs: [u64; IDT_ENTRIES];
}

impl ExceptionFrame {
    /// Whether the processor was in user mode (CPL 3, SDM Vol. 3A §5.5) when it took the
    /// exception or interrupt.
    pub fn came_from_user_mode(&self) -> bool {
        self.cs & 3 == 3
    }
}

/// Called by the common stub path with the frame it built on the stack.
#[no_mangle]
extern "sysv64" fn lavender_exception_entry(frame: &mut ExceptionFrame) {
    if frame.vector < EXCEPTION_VECTORS {
        crate::kernel::trap::handle(frame);
    } else {
        crate::kernel::interrupts::handle(frame.vector as u8, frame.came_from_user_mode());
    }
    if frame.came_from_user_mode() {
        crate::kernel::process::before_user_return();
    }
}

#[repr(C, align(16))]
struct Idt([Gate; IDT_ENTRIES]);

static IDT: Once<Idt> = Once::new();

fn build() -> Idt {
    // SAFETY: `lavender_exception_stubs` is an initialized read-only table emitted by the
    // assembly above, exactly IDT_ENTRIES addresses long.
    let stubs = unsafe { lavender_exception_stubs };
    let mut gates = [Gate::MISSING; IDT_ENTRIES];
    for (vector, (gate, stub)) in gates.iter_mut().zip(stubs).enumerate() {
        let ist = match vector {
            DOUBLE_FAULT => DOUBLE_FAULT_IST,
            NMI => NMI_IST,
            _ => 0,
        };
        *gate = Gate::interrupt(stub, KERNEL_CODE_SELECTOR, ist);
    }
    Idt(gates)
}

/// Loads the IDT on this core. The GDT (with this core's TSS, for the #DF stack) must be
/// loaded first.
pub fn load() {
    let idt = IDT.call_once(build);
    let pointer = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::from_ptr(idt),
    };
    // SAFETY: the table is a `'static` that is never modified after `call_once`; its gates
    // point at the stubs above, in KERNEL_CODE_SELECTOR, which `gdt::load` has put in CS, and
    // the #DF gate's IST slot is set in every TSS.
    unsafe { lidt(&pointer) };
}
