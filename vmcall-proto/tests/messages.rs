//! Message, hypercall and boot-info tests: unit cases, round trips of every message type, and
//! arbitrary bytes through every decoder (proptest).
#![cfg(not(loom))]

use proptest::prelude::*;
use vmcall_proto::bootinfo::{
    BootInfo, BootInfoError, MemoryKind, MemoryRegion, SharedRegionInfo, BOOT_INFO_SIZE,
    PEER_HYPERVISOR,
};
use vmcall_proto::cores::{CoreId, CoreSet, MAX_CORES};
use vmcall_proto::hypercall::{
    hello_matches, hello_reply, panic_text, ConsoleChunk, CoreOwnership, CoreRelease, CoreState,
    ForcedState, ForcedStateRequest, Hypercall, HypercallResult, PanicMessage, Privilege, Status,
    UnknownStatus, Wake, FORCED_STATE_BYTES, PANIC_MESSAGE_MAX,
};
use vmcall_proto::message::*;
use vmcall_proto::region::BufferRef;
use vmcall_proto::ABI_VERSION;

const WINDOW: u64 = 1 << 16;

fn core() -> impl Strategy<Value = CoreId> {
    (0..MAX_CORES as u64).prop_map(|index| CoreId::new(index).unwrap())
}

fn buffer() -> impl Strategy<Value = BufferRef> {
    prop_oneof![
        Just(BufferRef::EMPTY),
        (0..WINDOW / 8, 1..4096u32).prop_map(|(word, len)| BufferRef {
            offset: (word * 8) as u32,
            len: len.min((WINDOW - word * 8) as u32),
        }),
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        (0..=i64::MAX as u64).prop_map(Outcome::Value),
        (1..=Errno::MAX).prop_map(|errno| Outcome::Errno(Errno::new(errno).unwrap())),
    ]
}

fn load_report() -> impl Strategy<Value = LoadReport> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<i16>(),
        proptest::collection::vec((core(), 0..=1000u16), 0..MAX_CORES),
        0..3u8,
        any::<bool>(),
    )
        .prop_map(
            |(timestamp, window, runnable, delta, cores, hint, final_offer)| {
                let mut report = LoadReport::new(timestamp, window, runnable, delta)
                    .with_hint(WorkloadHint::from_u8(hint).unwrap())
                    .with_final_offer(final_offer);
                for (core, busy) in cores {
                    report.set_busy(core, Permille::new(busy).unwrap());
                }
                report
            },
        )
}

fn core_event() -> impl Strategy<Value = CoreEvent> {
    (core(), any::<u32>(), 0..9u8).prop_map(|(core, deadline_us, kind)| match kind {
        0 => CoreEvent::Grant { core },
        1 => CoreEvent::Revoke {
            core,
            deadline_us,
            negotiable: false,
        },
        2 => CoreEvent::Released { core },
        3 => CoreEvent::Online { core },
        4 => CoreEvent::Offline { core },
        5 => CoreEvent::Taken { core },
        6 => CoreEvent::Revoke {
            core,
            deadline_us,
            negotiable: true,
        },
        7 => CoreEvent::Declined {
            core,
            reason: DeclineReason::Busy,
        },
        _ => CoreEvent::Declined {
            core,
            reason: DeclineReason::Unable,
        },
    })
}

fn guest_event() -> impl Strategy<Value = GuestEvent> {
    (
        any::<u32>(),
        prop_oneof![Just(DownState::Stopped), Just(DownState::Halted)],
    )
        .prop_map(|(guest, state)| GuestEvent::Down { guest, state })
}

fn process_state() -> impl Strategy<Value = ProcessState> {
    prop_oneof![
        Just(ProcessState::Started),
        Just(ProcessState::Stopped),
        Just(ProcessState::Continued),
        any::<i32>().prop_map(|status| ProcessState::Exited { status }),
        (1..=64u8).prop_map(|signal| ProcessState::Killed { signal }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        load_report().prop_map(Message::LoadReport),
        core_event().prop_map(Message::CoreEvent),
        guest_event().prop_map(Message::GuestEvent),
        (
            any::<u64>(),
            core(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<[u64; 6]>(),
            any::<bool>(),
            buffer(),
            buffer()
        )
            .prop_map(
                |(request_id, core, process, thread, number, args, keep, a, b)| {
                    Message::SyscallRequest(SyscallRequest {
                        request_id,
                        caller: Caller {
                            core,
                            process,
                            thread,
                        },
                        number,
                        args,
                        flags: if keep {
                            SyscallFlags::CONTINUATION
                        } else {
                            SyscallFlags::empty()
                        },
                        buffers: [a, b],
                    })
                }
            ),
        (any::<u64>(), outcome()).prop_map(|(request_id, outcome)| Message::Reply(Reply {
            request_id,
            outcome
        })),
        (any::<u64>(), outcome()).prop_map(|(request_id, outcome)| {
            Message::Notification(Notification::Completion {
                request_id,
                outcome,
            })
        }),
        (any::<u32>(), process_state()).prop_map(|(process, state)| {
            Message::Notification(Notification::ProcessState { process, state })
        }),
        (
            any::<u64>(),
            1..=MAX_CORES as u16,
            0..4u16,
            buffer(),
            buffer()
        )
            .prop_filter("exec names a program", |(_, _, _, program, _)| program.len
                > 0)
            .prop_map(|(request_id, cores, flags, program, arguments)| {
                Message::ProcessCommand(ProcessCommand::Exec {
                    request_id,
                    cores,
                    flags: ExecFlags::from_bits_truncate(flags),
                    program,
                    arguments,
                })
            }),
        (any::<u64>(), any::<u32>(), 0..4u8).prop_map(|(request_id, process, action)| {
            let action = [
                ProcessAction::Kill,
                ProcessAction::Stop,
                ProcessAction::Continue,
                ProcessAction::Interrupt,
            ][usize::from(action)];
            Message::ProcessCommand(ProcessCommand::Signal {
                request_id,
                process,
                action,
            })
        }),
        any::<u64>()
            .prop_map(|request_id| Message::ProcessCommand(ProcessCommand::List { request_id })),
        (
            (any::<u64>(), any::<u32>(), 0..3u8, any::<u16>()),
            (
                any::<u32>(),
                any::<i32>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<[u8; 16]>()
            ),
        )
            .prop_map(
                |(
                    (request_id, process, state, cores),
                    (threads, status, cpu_us, calls, ran_on, name),
                )| {
                    let state = [
                        ListedState::Running,
                        ListedState::Stopped,
                        ListedState::Exited,
                    ][usize::from(state)];
                    Message::ProcessListEntry(ProcessListEntry {
                        request_id,
                        process,
                        state,
                        cores,
                        threads,
                        status,
                        cpu_us,
                        calls,
                        ran_on,
                        name,
                    })
                }
            ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Every message decodes from its encoding followed by any number of zero bytes (a record
    /// slot's padding), and from nothing shorter; a non-zero byte anywhere after the encoding is
    /// refused, naming how many bytes follow the message.
    #[test]
    fn every_message_round_trips(message in message(),
                                 padding in any::<prop::sample::Index>(),
                                 stray in any::<prop::sample::Index>(),
                                 stray_value in 1..=255u8) {
        let mut slot = [0u8; 512];
        let len = message.encode(&mut slot).unwrap();
        prop_assert_eq!(Message::decode(&slot[..len], WINDOW), Ok(message));
        let padded = len + padding.index(slot.len() - len + 1);
        prop_assert_eq!(Message::decode(&slot[..padded], WINDOW), Ok(message));
        // A shorter encoding is refused.
        prop_assert!(Message::decode(&slot[..len - 1], WINDOW).is_err());
        // A non-zero byte after the message is refused.
        if padded > len {
            slot[len + stray.index(padded - len)] = stray_value;
            prop_assert_eq!(
                Message::decode(&slot[..padded], WINDOW),
                Err(DecodeError::TrailingBytes { extra: padded - len })
            );
        }
        // Too small an output is an error, not a panic.
        prop_assert!(message.encode(&mut slot[..len - 1]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..300),
                                               window in any::<u64>()) {
        let _ = Message::decode(&bytes, window);
        let _ = LoadReport::decode(&bytes);
        let _ = CoreEvent::decode(&bytes);
        let _ = GuestEvent::decode(&bytes);
        let _ = HypervisorEvent::decode(&bytes);
        let _ = SyscallRequest::decode(&bytes, window);
        let _ = Reply::decode(&bytes);
        let _ = Notification::decode(&bytes);
        let _ = ProcessCommand::decode(&bytes, window);
        let _ = ProcessListEntry::decode(&bytes);
        let _ = BootInfo::read(&bytes);
    }

    /// Flipping any one bit of a valid encoding gives either an error or a message that
    /// re-encodes to exactly those bytes, less any zero padding (no field is silently ignored;
    /// a flipped tag may name a shorter message that the rest, if zero, pads).
    #[test]
    fn bit_flips_are_rejected_or_faithful(message in message(), bit in any::<prop::sample::Index>()) {
        let mut slot = [0u8; 256];
        let len = message.encode(&mut slot).unwrap();
        let bit = bit.index(len * 8);
        slot[bit / 8] ^= 1 << (bit % 8);
        if let Ok(decoded) = Message::decode(&slot[..len], WINDOW) {
            let mut again = [0u8; 256];
            let again_len = decoded.encode(&mut again).unwrap();
            prop_assert!(again_len <= len);
            prop_assert_eq!(&again[..again_len], &slot[..again_len]);
            prop_assert!(slot[again_len..len].iter().all(|&byte| byte == 0));
        }
    }

    #[test]
    fn arbitrary_boot_info_pages_never_panic(bytes in proptest::collection::vec(any::<u8>(), BOOT_INFO_SIZE..=BOOT_INFO_SIZE),
                                             keep_prefix in 0..64usize) {
        // Start from a valid page and overwrite it after `keep_prefix` bytes.
        let mut page = valid_page();
        page[keep_prefix..].copy_from_slice(&bytes[keep_prefix..]);
        let _ = BootInfo::read(&page);
    }

    #[test]
    fn status_and_hypercall_numbers_round_trip(raw in any::<u64>()) {
        match Status::try_from(raw) {
            Ok(status) => prop_assert_eq!(status as u64, raw),
            Err(UnknownStatus(value)) => prop_assert_eq!(value, raw),
        }
        if let Ok(call) = Hypercall::try_from(raw) {
            prop_assert_eq!(call as u64, raw);
        }
    }

    #[test]
    fn console_chunks_round_trip(text in proptest::collection::vec(any::<u8>(), 0..64)) {
        let chunk = ConsoleChunk::new(&text);
        prop_assert_eq!(chunk.as_bytes(), &text[..text.len().min(32)]);
        prop_assert_eq!(ConsoleChunk::from_args(chunk.to_args()), Ok(chunk));
    }

    #[test]
    fn core_releases_round_trip(
        core in core(),
        wake in proptest::option::of((core(), 32u8..=255).prop_map(|(core, vector)| Wake { core, vector })),
    ) {
        let release = CoreRelease { core, wake };
        prop_assert_eq!(CoreRelease::from_args(release.to_args()), Ok(release));
    }

    #[test]
    fn panic_and_forced_state_arguments_are_checked(
        args in proptest::array::uniform5(any::<u64>()),
        text in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        // Whatever a guest puts in the registers decodes to what it re-encodes to, or is refused.
        if let Ok(message) = PanicMessage::from_args(args) {
            prop_assert!(message.len <= PANIC_MESSAGE_MAX);
            prop_assert_eq!(message.to_args(), args);
        }
        if let Ok(request) = ForcedStateRequest::from_args(args) {
            prop_assert_eq!(request.to_args(), args);
        }
        if let Ok(accepted) = panic_text(&text) {
            prop_assert!(accepted.bytes().all(|byte| (0x20..0x7f).contains(&byte)));
            prop_assert!(!accepted.contains("@@"));
        }
    }

    #[test]
    fn core_release_arguments_are_checked(args in proptest::array::uniform5(any::<u64>())) {
        // Whatever a guest puts in the registers decodes to what it re-encodes to, or is refused.
        if let Ok(release) = CoreRelease::from_args(args) {
            prop_assert_eq!(release.to_args(), args);
        }
    }
}

#[test]
fn core_release_refuses_bad_wakes() {
    let three = CoreId::new(3).unwrap();
    let release = |args| CoreRelease::from_args(args);
    assert_eq!(
        release([3, 0, 0, 0, 0]),
        Ok(CoreRelease {
            core: three,
            wake: None
        })
    );
    assert_eq!(
        release([3, 1, 0x31, 0, 0]),
        Ok(CoreRelease {
            core: three,
            wake: Some(Wake {
                core: CoreId::new(1).unwrap(),
                vector: 0x31
            })
        })
    );
    // An exception vector, a vector past 255, a core without a vector, cores out of range
    // and stray registers are all refused.
    assert_eq!(release([3, 1, 14, 0, 0]), Err(Status::InvalidArgument));
    assert_eq!(release([3, 1, 256, 0, 0]), Err(Status::InvalidArgument));
    assert_eq!(release([3, 1, 0, 0, 0]), Err(Status::InvalidArgument));
    assert_eq!(release([64, 0, 0, 0, 0]), Err(Status::InvalidCore));
    assert_eq!(release([3, 64, 0x31, 0, 0]), Err(Status::InvalidCore));
    assert_eq!(release([3, 0, 0, 1, 0]), Err(Status::InvalidArgument));
}

#[test]
fn a_guest_down_event_shares_ring_0_with_core_events() {
    let down = GuestEvent::Down {
        guest: 1,
        state: DownState::Stopped,
    };
    // A whole 64-byte record slot, as ring 0 carries it.
    let mut slot = [0u8; 64];
    let len = HypervisorEvent::Guest(down).encode(&mut slot).unwrap();
    assert_eq!(len, GuestEvent::ENCODED_LEN);
    assert_eq!(slot[..12], [0x02, 0x02, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0]);
    assert_eq!(
        HypervisorEvent::decode(&slot),
        Ok(HypervisorEvent::Guest(down))
    );
    let taken = CoreEvent::Taken {
        core: CoreId::new(2).unwrap(),
    };
    let mut core_slot = [0u8; 64];
    taken.encode(&mut core_slot).unwrap();
    assert_eq!(
        HypervisorEvent::decode(&core_slot),
        Ok(HypervisorEvent::Core(taken))
    );
    // A core event's decoder refuses the guest event, so an older reader skips it as
    // malformed instead of misreading it.
    assert_eq!(
        CoreEvent::decode(&slot),
        Err(DecodeError::WrongTag {
            expected: tag::CORE_EVENT,
            found: tag::GUEST_EVENT
        })
    );
    let mut bad = slot;
    bad[4] = 2;
    assert_eq!(
        HypervisorEvent::decode(&bad),
        Err(DecodeError::BadEnumValue {
            field: "guest event kind",
            value: 2
        })
    );
    let mut bad = slot;
    bad[5] = 3;
    assert_eq!(
        GuestEvent::decode(&bad),
        Err(DecodeError::BadEnumValue {
            field: "guest down state",
            value: 3
        })
    );
    for reserved in [6, 7, 12, 15] {
        let mut bad = slot;
        bad[reserved] = 1;
        assert_eq!(
            GuestEvent::decode(&bad),
            Err(DecodeError::ReservedBitsSet {
                field: "guest event"
            }),
            "byte {reserved}"
        );
    }
    // Anything else on ring 0 is refused by its tag.
    let mut reply = [0u8; 64];
    Reply {
        request_id: 1,
        outcome: Outcome::Value(0),
    }
    .encode(&mut reply)
    .unwrap();
    assert_eq!(
        HypervisorEvent::decode(&reply),
        Err(DecodeError::UnknownTag(tag::REPLY))
    );
    assert!(matches!(
        HypervisorEvent::decode(&slot[..9]),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn decoders_name_what_is_malformed() {
    let mut slot = [0u8; 64];
    let len = CoreEvent::Revoke {
        core: CoreId::new(3).unwrap(),
        deadline_us: 500,
        negotiable: true,
    }
    .encode(&mut slot)
    .unwrap();
    assert_eq!(len, CoreEvent::ENCODED_LEN);
    let mut bad = slot;
    bad[4] = 9;
    assert_eq!(
        CoreEvent::decode(&bad[..len]),
        Err(DecodeError::BadEnumValue {
            field: "core event kind",
            value: 9
        })
    );
    let mut bad = slot;
    bad[2] = 1;
    assert_eq!(
        CoreEvent::decode(&bad[..len]),
        Err(DecodeError::ReservedBitsSet {
            field: "message header"
        })
    );
    let mut bad = slot;
    bad[6] = 200;
    assert!(matches!(
        CoreEvent::decode(&bad[..len]),
        Err(DecodeError::OutOfRange { .. })
    ));
    assert!(matches!(
        CoreEvent::decode(&slot[..5]),
        Err(DecodeError::Truncated { .. })
    ));
    assert_eq!(
        Message::decode(&[0xff, 0xff, 0, 0], WINDOW),
        Err(DecodeError::UnknownTag(0xffff))
    );
    // A whole 64-byte record slot: the event and zero padding decodes; a stray byte does not.
    assert_eq!(
        CoreEvent::decode(&slot),
        Ok(CoreEvent::Revoke {
            core: CoreId::new(3).unwrap(),
            deadline_us: 500,
            negotiable: true,
        })
    );
    // Revoke flags beyond the negotiable bit, an argument on another event and an unknown
    // decline reason are refused.
    let mut bad = slot;
    bad[5] = 2;
    assert_eq!(
        CoreEvent::decode(&bad[..len]),
        Err(DecodeError::ReservedBitsSet {
            field: "revoke flags"
        })
    );
    let mut online = [0u8; 16];
    CoreEvent::Online {
        core: CoreId::new(3).unwrap(),
    }
    .encode(&mut online)
    .unwrap();
    online[5] = 1;
    assert_eq!(
        CoreEvent::decode(&online),
        Err(DecodeError::ReservedBitsSet {
            field: "core event argument"
        })
    );
    let mut declined = [0u8; 16];
    CoreEvent::Declined {
        core: CoreId::new(3).unwrap(),
        reason: DeclineReason::Busy,
    }
    .encode(&mut declined)
    .unwrap();
    assert_eq!(declined[4..6], [7, 1]);
    declined[5] = 0;
    assert_eq!(
        CoreEvent::decode(&declined),
        Err(DecodeError::BadEnumValue {
            field: "decline reason",
            value: 0
        })
    );
    let mut bad = slot;
    bad[63] = 1;
    assert_eq!(
        CoreEvent::decode(&bad),
        Err(DecodeError::TrailingBytes { extra: 64 - len })
    );

    let request = SyscallRequest {
        request_id: 1,
        caller: Caller {
            core: CoreId::new(1).unwrap(),
            process: 2,
            thread: 3,
        },
        number: 0,
        args: [0; 6],
        flags: SyscallFlags::CONTINUATION,
        buffers: [
            BufferRef {
                offset: 64,
                len: 100,
            },
            BufferRef::EMPTY,
        ],
    };
    let len = request.encode(&mut slot).err().map(|_| 0).unwrap_or(0);
    assert_eq!(len, 0, "92 bytes do not fit a 64-byte buffer");
    let mut big = [0u8; 128];
    let len = request.encode(&mut big).unwrap();
    assert_eq!(len, SyscallRequest::ENCODED_LEN);
    assert!(matches!(
        SyscallRequest::decode(&big[..len], 100),
        Err(DecodeError::Buffer(_))
    ));
    big[14] = 0x80; // unknown syscall flag bit
    assert_eq!(
        SyscallRequest::decode(&big[..len], WINDOW),
        Err(DecodeError::ReservedBitsSet {
            field: "syscall flags"
        })
    );
}

#[test]
fn hello_depends_on_argument_and_version() {
    assert_ne!(hello_reply(1), hello_reply(2));
    assert_ne!(hello_reply(0), 0);
    let answer = HypercallResult {
        results: [hello_reply(5), u64::from(ABI_VERSION.to_u32())],
    };
    assert!(hello_matches(5, answer));
    assert!(!hello_matches(6, answer));
    assert_eq!(Hypercall::try_from(0x07), Ok(Hypercall::QueryCore));
    assert_eq!(Hypercall::try_from(0x42), Err(Status::UnknownHypercall));
    assert_eq!(Status::try_from(9), Ok(Status::NotSupported));
    // Management calls are never open to unprivileged guest users.
    for call in Hypercall::ALL {
        let open_to_users = call.privilege() == Privilege::Any;
        assert_eq!(
            open_to_users,
            matches!(call, Hypercall::Hello | Hypercall::QueryCore),
            "{call:?}"
        );
    }
    assert_eq!(Hypercall::TestGrantCore.privilege(), Privilege::Test);
}

#[test]
fn kernel_calls_from_user_mode_need_the_holder_token() {
    let kernel = Hypercall::CoreMove.privilege();
    assert_eq!(kernel, Privilege::Kernel);
    assert!(kernel.allows(0, 0, 0x1234, false));
    assert!(kernel.allows(3, 0x1234, 0x1234, false));
    assert!(!kernel.allows(3, 0, 0x1234, false));
    assert!(!kernel.allows(3, 0x1235, 0x1234, false));
    // A guest without a token: its user mode never gets kernel calls, not even with 0.
    assert!(!kernel.allows(3, 0, 0, false));
    assert!(Privilege::Any.allows(3, 0, 0, false));
    assert!(!Privilege::Test.allows(0, 0, 0x1234, false));
    assert!(Privilege::Test.allows(3, 0x1234, 0x1234, true));
}

#[test]
fn panic_arguments_are_bounded() {
    let message = PanicMessage {
        address: 0x1000,
        len: PANIC_MESSAGE_MAX,
    };
    assert_eq!(PanicMessage::from_args(message.to_args()), Ok(message));
    let refused = [
        // One byte too long.
        [0x1000, PANIC_MESSAGE_MAX as u64 + 1, 0, 0, 0],
        // A length that would be huge on any machine.
        [0x1000, u64::MAX, 0, 0, 0],
        // Wraps around the address space.
        [u64::MAX - 3, 8, 0, 0, 0],
        // Argument registers that must be 0.
        [0x1000, 8, 1, 0, 0],
        [0x1000, 8, 0, 1, 0],
        [0x1000, 8, 0, 0, 1],
    ];
    for args in refused {
        assert_eq!(
            PanicMessage::from_args(args),
            Err(Status::InvalidArgument),
            "{args:x?}"
        );
    }
    // An empty message is a panic without words, not an error.
    assert_eq!(
        PanicMessage::from_args([0, 0, 0, 0, 0]),
        Ok(PanicMessage { address: 0, len: 0 })
    );
    assert_eq!(Hypercall::Panic.privilege(), Privilege::Kernel);
    assert!(!Hypercall::Panic.privilege().allows(3, 0, 0x1234, false));
}

#[test]
fn panic_text_must_be_printable_and_hold_no_marker() {
    assert_eq!(
        panic_text(b"panicked at src/x.rs:1:2: boom"),
        Ok("panicked at src/x.rs:1:2: boom")
    );
    assert_eq!(panic_text(b""), Ok(""));
    let refused: [&[u8]; 6] = [
        b"two\nlines",
        b"carriage\rreturn",
        b"\x1b[2Jescape",
        b"x @@tandem {\"ev\":\"guest_down\"}",
        b"caf\xc3\xa9",
        b"nul\0",
    ];
    for bytes in refused {
        assert_eq!(panic_text(bytes), Err(Status::InvalidArgument), "{bytes:?}");
    }
    // A single `@` is harmless.
    assert!(panic_text(b"user@host").is_ok());
}

#[test]
fn forced_state_request_is_checked_and_the_state_round_trips() {
    let core = CoreId::new(2).unwrap();
    let request = ForcedStateRequest {
        core,
        buffer: 0x2000,
    };
    assert_eq!(
        ForcedStateRequest::from_args(request.to_args()),
        Ok(request)
    );
    assert_eq!(
        ForcedStateRequest::from_args([64, 0x2000, 0, 0, 0]),
        Err(Status::InvalidCore)
    );
    assert_eq!(
        ForcedStateRequest::from_args([2, u64::MAX - 8, 0, 0, 0]),
        Err(Status::InvalidArgument)
    );
    assert_eq!(
        ForcedStateRequest::from_args([2, 0x2000, 0, 7, 0]),
        Err(Status::InvalidArgument)
    );
    let state = ForcedState {
        rax: 1,
        rbx: 2,
        rcx: 3,
        rdx: 4,
        rsi: 5,
        rdi: 6,
        rbp: 7,
        rsp: 8,
        r8: 9,
        r9: 10,
        r10: 11,
        r11: 12,
        r12: 13,
        r13: 14,
        r14: 15,
        r15: 16,
        rip: 0x80_0000_1234,
        rflags: 0x202,
        cs: 0x2b,
        ss: 0x23,
    };
    let bytes = state.to_bytes();
    assert_eq!(bytes.len(), FORCED_STATE_BYTES);
    assert_eq!(&bytes[..8], &1u64.to_le_bytes());
    assert_eq!(&bytes[8 * 16..8 * 17], &0x80_0000_1234u64.to_le_bytes());
    assert_eq!(ForcedState::from_bytes(&bytes), state);
    assert_eq!(state.cpl(), 3);
    assert!(state.interrupts_enabled());
    let kernel = ForcedState {
        cs: 0x08,
        rflags: 0x2,
        ..state
    };
    assert_eq!(kernel.cpl(), 0);
    assert!(!kernel.interrupts_enabled());
}

#[test]
fn console_chunk_rejects_long_counts_and_stray_bytes() {
    assert_eq!(
        ConsoleChunk::from_args([33, 0, 0, 0, 0]),
        Err(Status::InvalidArgument)
    );
    assert_eq!(
        ConsoleChunk::from_args([1, 0xff00, 0, 0, 0]),
        Err(Status::InvalidArgument)
    );
}

#[test]
fn core_ownership_packs_and_validates() {
    let owned = CoreOwnership {
        core: CoreId::new(5).unwrap(),
        state: CoreState::Owned,
        owner: Some(1),
    };
    assert_eq!(CoreOwnership::from_u64(owned.to_u64()), Ok(owned));
    let parked = CoreOwnership {
        core: CoreId::new(0).unwrap(),
        state: CoreState::Parked,
        owner: None,
    };
    assert_eq!(CoreOwnership::from_u64(parked.to_u64()), Ok(parked));
    assert!(CoreOwnership::from_u64(0).is_err());
}

fn valid_info() -> BootInfo {
    let boot = CoreId::new(1).unwrap();
    let initial = CoreSet::EMPTY.with(boot);
    let allowed = initial
        .with(CoreId::new(2).unwrap())
        .with(CoreId::new(3).unwrap());
    let mut info = BootInfo::new(2, boot, initial, allowed);
    info.add_memory_region(MemoryRegion {
        base: 0x10_0000,
        size: 0x100_0000,
        kind: MemoryKind::Usable,
        reserved: 0,
    })
    .unwrap();
    info.add_memory_region(MemoryRegion {
        base: 0x200_0000,
        size: 0x1000,
        kind: MemoryKind::Loaded,
        reserved: 0,
    })
    .unwrap();
    info.add_shared_region(SharedRegionInfo {
        guest_physical: 0x4000_0000,
        size: 0x20_0000,
        peer: PEER_HYPERVISOR,
        notify_doorbell: 1,
        wait_doorbell: 2,
        vector: 0xf0,
        reserved: [0; 7],
    })
    .unwrap();
    info.set_cmdline("policy=cooperative log=debug").unwrap();
    info
}

fn valid_page() -> Vec<u8> {
    let mut page = vec![0u8; BOOT_INFO_SIZE];
    valid_info().write(&mut page).unwrap();
    page
}

#[test]
fn boot_info_round_trips_and_validates() {
    let info = valid_info();
    let read = BootInfo::read(&valid_page()).unwrap();
    assert_eq!(read, info);
    assert_eq!(read.cmdline(), "policy=cooperative log=debug");
    assert_eq!(read.memory_regions().len(), 2);
    assert_eq!(read.shared_regions()[0].size, 0x20_0000);
    assert_eq!(read.boot_core(), CoreId::new(1).unwrap());

    let mut page = valid_page();
    page[8..12].copy_from_slice(&(ABI_VERSION.to_u32() + 1).to_le_bytes());
    let error = BootInfo::read(&page).unwrap_err();
    assert!(matches!(error, BootInfoError::Version(_)));
    assert!(error.to_string().contains(&ABI_VERSION.to_string()));

    let mut overlapping = valid_info();
    overlapping
        .add_memory_region(MemoryRegion {
            base: 0x20_0000,
            size: 0x1000,
            kind: MemoryKind::Usable,
            reserved: 0,
        })
        .unwrap();
    assert!(matches!(
        overlapping.write(&mut [0u8; BOOT_INFO_SIZE]),
        Err(BootInfoError::Overlap { .. })
    ));
    assert!(matches!(
        BootInfo::read(&page[..100]),
        Err(BootInfoError::PageTooSmall { .. })
    ));
}

/// The workload hint sits in what was a reserved byte: a report without one (ABI 2.2) reads
/// as `Unknown`, and a hint value the ABI does not define is refused.
#[test]
fn load_report_hint_decodes_and_unknown_values_are_refused() {
    let mut bytes = [0u8; 64];
    let report = LoadReport::new(1, 2, 3, -1).with_hint(WorkloadHint::IoBound);
    let len = report.encode(&mut bytes).unwrap();
    assert_eq!(
        LoadReport::decode(&bytes[..len]).unwrap().hint,
        WorkloadHint::IoBound
    );
    let without = LoadReport::new(1, 2, 3, -1);
    let len = without.encode(&mut bytes).unwrap();
    assert_eq!(
        LoadReport::decode(&bytes[..len]).unwrap().hint,
        WorkloadHint::Unknown
    );
    // The hint byte follows the header, runnable, timestamp, window and delta.
    let at = (0..len)
        .find(|&i| {
            let mut b = bytes;
            b[i] = 2;
            LoadReport::decode(&b[..len]).is_ok_and(|r| r.hint == WorkloadHint::IoBound)
        })
        .expect("a hint byte");
    bytes[at] = 7;
    assert!(LoadReport::decode(&bytes[..len]).is_err());
}

/// The byte after the hint holds the report's flags: bit 0 is the final offer, and a report
/// with any other bit set is refused.
#[test]
fn load_report_final_offer_round_trips_and_other_flag_bits_are_refused() {
    let mut bytes = [0u8; 64];
    for final_offer in [false, true] {
        let report = LoadReport::new(1, 2, 0, -1).with_final_offer(final_offer);
        let len = report.encode(&mut bytes).unwrap();
        assert_eq!(LoadReport::decode(&bytes[..len]), Ok(report));
    }
    let len = LoadReport::new(1, 2, 0, -1)
        .with_hint(WorkloadHint::Compute)
        .with_final_offer(true)
        .encode(&mut bytes)
        .unwrap();
    // The flags byte follows the hint byte: header 4, runnable 4, timestamp 8, window 4,
    // delta 2, hint 1.
    assert_eq!((bytes[22], bytes[23]), (1, 1));
    for bit in 1..8 {
        let mut b = bytes;
        b[23] |= 1 << bit;
        assert!(
            matches!(
                LoadReport::decode(&b[..len]),
                Err(DecodeError::ReservedBitsSet { .. })
            ),
            "flag bit {bit}"
        );
    }
}
