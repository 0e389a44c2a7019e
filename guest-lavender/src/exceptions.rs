//! Facts about the 32 architectural exception vectors, and the recovery rule for probes.

/// Mnemonic of exception `vector` (Intel SDM Vol. 3A §6.3.1, Table 6-1).
pub fn mnemonic(vector: u8) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        9 => "coprocessor segment overrun",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        28 => "#HV",
        29 => "#VC",
        30 => "#SX",
        15 | 22..=27 | 31 => "reserved",
        _ => "interrupt",
    }
}

/// The Unix signal a process killed by exception `vector` in user mode dies of, as Linux
/// chooses it on x86-64 (`arch/x86/kernel/traps.c`): a shell then shows `128 + signal`.
pub const fn signal(vector: u8) -> u8 {
    const SIGILL: u8 = 4;
    const SIGTRAP: u8 = 5;
    const SIGBUS: u8 = 7;
    const SIGFPE: u8 = 8;
    const SIGSEGV: u8 = 11;
    match vector {
        0 | 7 | 16 | 19 => SIGFPE,
        1 | 3 => SIGTRAP,
        6 => SIGILL,
        11 | 12 | 17 => SIGBUS,
        _ => SIGSEGV,
    }
}

/// Whether the processor pushes an error code for exception `vector` (Table 6-1, "Error
/// Code" column; #CP, #VC and #SX from the same table in current editions). The entry stubs push
/// a zero for the others so every handler sees one frame layout.
pub const fn pushes_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// #GP: what the hypervisor injects when it refuses an access under its "fault" policy.
pub const GENERAL_PROTECTION: u8 = 13;

/// A probe instruction that may fault, and where execution resumes if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArmedProbe {
    /// Address of the probing instruction.
    pub fault_rip: u64,
    /// Address to resume at instead (the probe's fault exit).
    pub resume_rip: u64,
}

/// Where to resume after exception `vector` at `rip`, if it is the #GP an armed probe expects.
/// Any other exception, or a #GP elsewhere, is a real fault and is not recovered: a kernel bug
/// must never pass for the hypervisor's refusal.
pub fn recovery_target(armed: Option<ArmedProbe>, vector: u8, rip: u64) -> Option<u64> {
    armed
        .filter(|probe| vector == GENERAL_PROTECTION && probe.fault_rip == rip)
        .map(|probe| probe.resume_rip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_map_to_the_signals_linux_sends() {
        assert_eq!(signal(14), 11, "#PF is SIGSEGV");
        assert_eq!(signal(13), 11, "#GP is SIGSEGV");
        assert_eq!(signal(0), 8, "#DE is SIGFPE");
        assert_eq!(signal(6), 4, "#UD is SIGILL");
        assert_eq!(signal(3), 5, "#BP is SIGTRAP");
        assert_eq!(signal(17), 7, "#AC is SIGBUS");
    }

    #[test]
    fn error_code_vectors_match_the_sdm() {
        let with_code: Vec<u8> = (0..32)
            .filter(|vector| pushes_error_code(*vector))
            .collect();
        assert_eq!(with_code, vec![8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }

    #[test]
    fn names() {
        assert_eq!(mnemonic(13), "#GP");
        assert_eq!(mnemonic(15), "reserved");
        assert_eq!(mnemonic(31), "reserved");
        assert_eq!(mnemonic(32), "interrupt");
    }

    #[test]
    fn only_the_armed_general_protection_fault_is_recovered() {
        let armed = Some(ArmedProbe {
            fault_rip: 0x20_1000,
            resume_rip: 0x20_1010,
        });
        assert_eq!(
            recovery_target(armed, GENERAL_PROTECTION, 0x20_1000),
            Some(0x20_1010)
        );
        assert_eq!(
            recovery_target(armed, 14, 0x20_1000),
            None,
            "a page fault is a kernel bug"
        );
        assert_eq!(recovery_target(armed, GENERAL_PROTECTION, 0x20_1004), None);
        assert_eq!(recovery_target(None, GENERAL_PROTECTION, 0x20_1000), None);
    }
}
