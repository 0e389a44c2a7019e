//! The instructions a guest uses for 32-bit MMIO registers, decoded from their bytes so
//! that an access to an unmapped device page can be emulated: `MOV r/m32, r32` (89 /r),
//! `MOV r32, r/m32` (8B /r) and `MOV r/m32, imm32` (C7 /0), in 64-bit mode (SDM Vol. 2A
//! §2.1, §2.2.1 and MOV). Linux's `readl`/`writel` compile to the first two. Anything else
//! (other sizes, string or read-modify-write instructions, LOCK) is refused: the caller
//! stops the access with a clear error rather than guess.
//!
//! The memory operand's address is not computed: the VM exit gives the guest-physical
//! address. The decoder only needs the register operand and the instruction's length.

/// One decoded MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioInstruction {
    /// Stores the low 32 bits of general-purpose register `source` (0 = RAX .. 15 = R15).
    Store { source: u8, len: u8 },
    /// Stores an immediate.
    StoreImmediate { value: u32, len: u8 },
    /// Loads 32 bits into register `destination`, zero-extending it to 64 bits (SDM Vol. 1
    /// §3.4.1.1).
    Load { destination: u8, len: u8 },
}

impl MmioInstruction {
    pub fn length(self) -> u8 {
        match self {
            Self::Store { len, .. } | Self::StoreImmediate { len, .. } | Self::Load { len, .. } => {
                len
            }
        }
    }

    pub fn is_write(self) -> bool {
        !matches!(self, Self::Load { .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Not one of the three MOV forms (the byte is the opcode, or the offending prefix).
    Unsupported(u8),
    /// A 64-bit operand (REX.W) or a 16-bit one (66h).
    OperandSize,
    /// The ModRM byte names a register, not memory: no MMIO access.
    RegisterOperand,
    /// The bytes end inside the instruction.
    Truncated,
}

/// Legacy prefixes that do not change these instructions' meaning for MMIO: segment
/// overrides (in 64-bit mode only FS/GS have a base, which the exit's guest-physical
/// address already includes) and the address-size override (SDM Vol. 2A §2.1.1).
const HARMLESS_PREFIXES: [u8; 7] = [0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65, 0x67];
const OPERAND_SIZE_PREFIX: u8 = 0x66;
/// Longest x86 instruction (SDM Vol. 2A §2.3.11).
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// Decodes the instruction at the start of `bytes` (64-bit mode).
pub fn decode(bytes: &[u8]) -> Result<MmioInstruction, DecodeError> {
    let mut at = 0;
    let byte = |at: usize| bytes.get(at).copied().ok_or(DecodeError::Truncated);
    while HARMLESS_PREFIXES.contains(&byte(at)?) {
        at += 1;
    }
    match byte(at)? {
        OPERAND_SIZE_PREFIX => return Err(DecodeError::OperandSize),
        prefix @ (0xf0 | 0xf2 | 0xf3) => return Err(DecodeError::Unsupported(prefix)),
        _ => {}
    }
    // REX must come last, right before the opcode (SDM Vol. 2A §2.2.1).
    let rex = match byte(at)? {
        rex @ 0x40..=0x4f => {
            at += 1;
            rex
        }
        _ => 0,
    };
    if rex & 0b1000 != 0 {
        return Err(DecodeError::OperandSize);
    }
    let opcode = byte(at)?;
    if !matches!(opcode, 0x89 | 0x8b | 0xc7) {
        return Err(DecodeError::Unsupported(opcode));
    }
    let modrm = byte(at + 1)?;
    at += 2;
    let (mode, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if mode == 0b11 {
        return Err(DecodeError::RegisterOperand);
    }
    // SIB byte with rm = 100b; displacement by mode, and disp32 for RIP-relative (mode 00,
    // rm 101b) or a SIB base of 101b in mode 00 (SDM Vol. 2A Tables 2-2 and 2-3).
    let mut displacement = match mode {
        0b01 => 1,
        0b10 => 4,
        _ => 0,
    };
    if rm == 0b100 {
        let sib = byte(at)?;
        at += 1;
        if mode == 0 && sib & 7 == 0b101 {
            displacement = 4;
        }
    } else if mode == 0 && rm == 0b101 {
        displacement = 4;
    }
    at += displacement;
    let register = reg | ((rex & 0b100) << 1);
    let instruction = match opcode {
        0x89 => MmioInstruction::Store {
            source: register,
            len: 0,
        },
        0x8b => MmioInstruction::Load {
            destination: register,
            len: 0,
        },
        _ if reg != 0 => return Err(DecodeError::Unsupported(opcode)),
        _ => {
            let imm = bytes.get(at..at + 4).ok_or(DecodeError::Truncated)?;
            at += 4;
            MmioInstruction::StoreImmediate {
                value: u32::from_le_bytes([imm[0], imm[1], imm[2], imm[3]]),
                len: 0,
            }
        }
    };
    if at > bytes.len() || at > MAX_INSTRUCTION_LEN {
        return Err(DecodeError::Truncated);
    }
    let len = at as u8;
    Ok(match instruction {
        MmioInstruction::Store { source, .. } => MmioInstruction::Store { source, len },
        MmioInstruction::Load { destination, .. } => MmioInstruction::Load { destination, len },
        MmioInstruction::StoreImmediate { value, .. } => {
            MmioInstruction::StoreImmediate { value, len }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use MmioInstruction::*;

    #[test]
    fn linux_readl_and_writel_forms() {
        // mov (%rdx),%eax
        assert_eq!(
            decode(&[0x8b, 0x02]),
            Ok(Load {
                destination: 0,
                len: 2
            })
        );
        // mov %esi,0x10(%rax)
        assert_eq!(decode(&[0x89, 0x70, 0x10]), Ok(Store { source: 6, len: 3 }));
        // mov %r12d,(%rbx) (REX.R)
        assert_eq!(
            decode(&[0x44, 0x89, 0x23]),
            Ok(Store { source: 12, len: 3 })
        );
        // mov 0x10(%r13),%eax (REX.B, disp8)
        assert_eq!(
            decode(&[0x41, 0x8b, 0x45, 0x10]),
            Ok(Load {
                destination: 0,
                len: 4
            })
        );
        // mov %eax,0x12345678(%rip)
        assert_eq!(
            decode(&[0x89, 0x05, 0x78, 0x56, 0x34, 0x12]),
            Ok(Store { source: 0, len: 6 })
        );
        // mov %ecx,(%rax,%rbx,4) (SIB) and mov %ecx,0x40(,%rbx,1) (SIB, no base: disp32)
        assert_eq!(decode(&[0x89, 0x0c, 0x98]), Ok(Store { source: 1, len: 3 }));
        assert_eq!(
            decode(&[0x89, 0x0c, 0x1d, 0x40, 0, 0, 0]),
            Ok(Store { source: 1, len: 7 })
        );
        // mov %esp,0x100(%rsp) (SIB, disp32): RSP is register 4.
        assert_eq!(
            decode(&[0x89, 0xa4, 0x24, 0, 1, 0, 0]),
            Ok(Store { source: 4, len: 7 })
        );
        // movl $0x12,0x10(%rdi) and with a DS prefix.
        assert_eq!(
            decode(&[0xc7, 0x47, 0x10, 0x12, 0, 0, 0]),
            Ok(StoreImmediate {
                value: 0x12,
                len: 7
            })
        );
        assert_eq!(
            decode(&[0x3e, 0x8b, 0x02]),
            Ok(Load {
                destination: 0,
                len: 3
            })
        );
    }

    #[test]
    fn random_bytes_decode_or_fail_without_reading_past_them() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut decoded = 0;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut bytes = seed.to_le_bytes().to_vec();
            bytes.extend_from_slice(&(seed.rotate_left(29)).to_le_bytes()[..7]);
            // Make the three MOVs likely: an opcode after up to two prefixes.
            bytes[(seed % 3) as usize] = [0x89, 0x8b, 0xc7][(seed >> 60) as usize % 3];
            let len = (seed >> 56) as usize % 16;
            if let Ok(instruction) = decode(&bytes[..len]) {
                assert!(usize::from(instruction.length()) <= len, "{bytes:x?}");
                decoded += 1;
            }
        }
        assert!(decoded > 10_000, "{decoded}");
    }

    #[test]
    fn everything_else_is_refused() {
        // mov %rax,(%rdx): 64-bit. mov %ax,(%rdx): 16-bit.
        assert_eq!(decode(&[0x48, 0x89, 0x02]), Err(DecodeError::OperandSize));
        assert_eq!(decode(&[0x66, 0x89, 0x02]), Err(DecodeError::OperandSize));
        // mov %al,(%rdx); lock add; rep movsd; C7 with reg != 0.
        assert_eq!(decode(&[0x88, 0x02]), Err(DecodeError::Unsupported(0x88)));
        assert_eq!(
            decode(&[0xf0, 0x01, 0x02]),
            Err(DecodeError::Unsupported(0xf0))
        );
        assert_eq!(decode(&[0xf3, 0xa5]), Err(DecodeError::Unsupported(0xf3)));
        assert_eq!(
            decode(&[0xc7, 0x4f, 0x10, 0, 0, 0, 0]),
            Err(DecodeError::Unsupported(0xc7))
        );
        // mov %eax,%edx: no memory operand.
        assert_eq!(decode(&[0x89, 0xc2]), Err(DecodeError::RegisterOperand));
        // Cut short, and endless prefixes.
        assert_eq!(decode(&[0x89, 0x05, 0x78]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0xc7, 0x07, 1, 2]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x3e; 15]), Err(DecodeError::Truncated));
        let mut long = [0x3e; 16];
        long[13] = 0x89;
        long[14] = 0x02;
        assert_eq!(decode(&long), Ok(Store { source: 0, len: 15 }));
        long[13] = 0x3e;
        long[14] = 0x89;
        long[15] = 0x02;
        assert_eq!(decode(&long), Err(DecodeError::Truncated), "16 bytes");
    }
}
