//! Hypercalls: numbers, register convention, status codes and who may call what.
//!
//! # Register convention
//! A guest executes `VMCALL` with:
//!
//! | register | in                                   | out                     |
//! |----------|--------------------------------------|-------------------------|
//! | RAX      | hypercall number ([`Hypercall`])     | [`Status`] (0 = success)|
//! | RDI      | argument 0                           | result 0                |
//! | RSI      | argument 1                           | result 1                |
//! | RDX      | argument 2                           | preserved               |
//! | R10      | argument 3                           | preserved               |
//! | R8       | argument 4                           | preserved               |
//! | R9       | holder token (see below)             | preserved               |
//!
//! The argument registers follow the Linux system-call order (R10 in place of RCX), so guest
//! code can pass a syscall-style argument list straight through. Every other register is
//! preserved. Results are meaningful only when RAX is [`Status::Ok`].
//!
//! # Privilege
//! `VMCALL` exits to the hypervisor from any guest privilege level, so the hypervisor decides per
//! call from the caller's CPL (the DPL of the guest's SS in the VMCS):
//!
//! * [`Privilege::Any`] calls are accepted from CPL 3: they only read harmless information.
//! * [`Privilege::Kernel`] calls are accepted at CPL 0; from CPL 3 they return
//!   [`Status::PermissionDenied`], unless R9 holds the guest's *holder token*, which opens them
//!   at CPL 3 to the Linux PV agent (user space on a stock kernel). The token is published only
//!   in the header (`holder_token`) of the guest's control region, which Linux maps only as
//!   root; a guest without a control region has none (its header would carry 0).
//! * [`Privilege::Test`] calls are for test hooks, which no hypervisor build enables: they return
//!   [`Status::NotSupported`].
//!
//! Calls documented as *reserved* are not implemented by the hypervisor yet: they return
//! [`Status::NotSupported`] and do nothing.

use core::fmt;

use crate::cores::CoreId;
use crate::version::ABI_VERSION;

/// Who may make a hypercall (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// Any CPL, no token.
    Any,
    /// Guest kernel (CPL 0), or CPL 3 with the holder token in R9.
    Kernel,
    /// As `Kernel`, and only when the hypervisor runs with test hooks enabled.
    Test,
}

impl Privilege {
    /// Whether a caller at `cpl` presenting `presented` in R9 may make a call of this
    /// privilege, when its guest's holder token is `token` (0: the guest has none, and then
    /// no CPL 3 caller gets kernel calls) and test hooks are `test_hooks`.
    pub const fn allows(self, cpl: u8, presented: u64, token: u64, test_hooks: bool) -> bool {
        let kernel = cpl == 0 || (token != 0 && presented == token);
        match self {
            Self::Any => true,
            Self::Kernel => kernel,
            Self::Test => kernel && test_hooks,
        }
    }
}

/// Hypercall numbers, passed in RAX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Hypercall {
    /// Round-trip check. Any CPL. In: RDI = any value `x`. Out: RDI = [`hello_reply`]`(x)`,
    /// RSI = the hypervisor's [`AbiVersion::to_u32`](crate::AbiVersion::to_u32). A guest compares
    /// both to what it computes itself to prove the channel and the ABI agree.
    Hello = 0x00,
    /// Write to the hypervisor console. Kernel / holder (an unprivileged user could flood it).
    /// In: RDI = byte count (0..=32), RSI, RDX, R10, R8 = up to 32 bytes, little-endian. The bytes
    /// travel in registers so the hypervisor never walks guest page tables for them; see
    /// [`ConsoleChunk`].
    ConsoleWrite = 0x01,
    /// Ring a peer's doorbell: wake the guest the caller shares region RDI with, after
    /// publishing to a ring it may sleep on (the [doorbell rule](crate::ring)). Kernel / holder.
    /// In: RDI = the region's guest-physical base as the caller maps it (Lavender: its
    /// boot-info entry; Linux: its `tandem.shared=` word). Into Linux it raises the interrupt of the doorbell device
    /// on Linux's virtual PCI bus (PCI IDs [`crate::doorbell::VENDOR_ID`]:[`crate::doorbell::DEVICE_ID`],
    /// driven by Linux's stock `uio_pci_generic`; the device masks itself until Linux unmasks
    /// it); into Lavender it sends the `vector` its boot-info page gives for the region it
    /// shares with the caller. A peer that is not running is not woken, and the call still
    /// returns `Ok` (the caller hears of the peer's end on its own channel). Errors:
    /// `InvalidArgument` (no region shared with exactly one other guest at that base),
    /// `NotSupported` (the peer has no doorbell: a Linux that does not own the IOAPIC).
    Doorbell = 0x02,
    /// *Reserved (returns `NotSupported`).* Sleep this vCPU until a doorbell of this guest
    /// rings. Kernel / holder.
    /// In: RDI = doorbell number, RSI = timeout in microseconds (`u64::MAX` = none). Returns `Ok`
    /// if the doorbell rang (or had rung since the last wait: doorbells are latched), `TimedOut`,
    /// or `Interrupted` when an interrupt is pending for the vCPU (so a guest kernel is never
    /// starved of its timer).
    WaitDoorbell = 0x03,
    /// Hand a core back to the hypervisor. Kernel / holder. In: RDI = the calling core, RSI/RDX
    /// an optional wake ([`CoreRelease`]). The vCPU stops and the call does not return. Naming
    /// another core (the Linux agent's case, after offlining the CPU through sysfs) is
    /// reserved: `InvalidArgument`. Errors: `InvalidCore`, `InvalidArgument`, `NotOwner`.
    CoreRelease = 0x04,
    /// *Reserved (returns `NotSupported`).* Ask for more (positive) or fewer (negative) cores.
    /// Kernel / holder.
    /// In: RDI = delta as `i64`. Out: RDI = cores the caller holds after any immediate change.
    /// Grants and revokes that follow arrive as core events on the channel.
    CoreRequest = 0x05,
    /// Tell the hypervisor that a fresh load report is on the load-report ring, so it reads the
    /// ring now rather than at its next look (a cooperative policy would arbitrate then).
    /// Kernel / holder. No arguments.
    LoadReportKick = 0x06,
    /// Who owns a core. Any CPL: core ownership is not secret and monitoring tools read it.
    /// In: RDI = core. Out: RDI = [`CoreOwnership::to_u64`], RSI = [`CoreSet`](crate::cores::CoreSet) mask of the cores
    /// the calling guest holds.
    QueryCore = 0x07,
    /// Move a core to another guest (the management call behind `vmctl move-core`). Kernel /
    /// holder. In: RDI = core, RSI = target guest id, RDX = timeout in milliseconds (0: the
    /// hypervisor's default). Out: RDI = the move's id. The call only starts the move; its
    /// stages and outcome appear in the caller's status page (`crate::status_page`) under that
    /// id. Errors: `InvalidCore` (no such core), `InvalidArgument` (no such guest, a core the
    /// target may not hold, a guest's boot core, a core the target already holds), `Busy`
    /// (another move is in flight).
    CoreMove = 0x08,
    /// Ask for a fresh stats page (the management call behind `vmctl stats`). Kernel /
    /// holder. In: RDI = 0 to refresh the figures, 1 to start them over (reset) first.
    /// Out: RDI = the request's number. The call only asks: the hypervisor's BSP serves it at
    /// its next look, and the caller's stats page (`crate::status_page`) shows `request` at
    /// least RDI once it has. The counters themselves are written only by the cores they
    /// count; a reset moves the publisher's baseline. Errors: `InvalidArgument` for another
    /// RDI.
    Stats = 0x09,
    /// Switch the core-allocation policy (the management call behind `vmctl rebalance`).
    /// Kernel / holder. In: RDI = policy (0 static, 1 autonomous, 2 cooperative), RSI = the
    /// sampling period in milliseconds (0: keep the current one; at most 1000). The switch
    /// happens on the hypervisor's next look; the caller's status page names the policy in
    /// force (`policy`). Errors: `InvalidArgument` (no such policy, a period above 1000).
    SetPolicy = 0x0a,
    /// Report a kernel panic: the hypervisor stops the calling guest at once, as it stops one
    /// that triple-faults (every core of the guest leaves, its cores go back to the pool, the
    /// guests it shares a region with are told it is down). Kernel / holder. In: RDI = guest-physical address of the
    /// message, RSI = its length in bytes (0..=[`PANIC_MESSAGE_MAX`]), RDX, R10, R8 = 0; see
    /// [`PanicMessage`]. Does not return on success. Errors: `InvalidArgument` for a length
    /// above the limit, an argument register set that must be 0, a message not wholly in the
    /// guest's RAM, or text that is not printable ASCII or holds `@@` ([`panic_text`]); the
    /// guest runs on and may call again with a shorter or cleaner message.
    Panic = 0x0b,
    /// Read the registers a core of the caller had when the hypervisor took it by force
    /// (after its `Taken` core event), so the guest can resume the thread that ran there on
    /// another core. Kernel only. In: RDI = the core, RSI = guest-physical address of a
    /// [`FORCED_STATE_BYTES`]-byte buffer the hypervisor writes [`ForcedState`] into. Each
    /// core's state can be read once: the read hands it over. Errors: `InvalidCore`,
    /// `NotOwner` (no state of this guest is kept for the core: it was never taken from it by
    /// force, or the state was read already), `InvalidArgument` (a buffer not wholly in the
    /// guest's RAM, or RDX, R10, R8 not 0).
    ForcedState = 0x0c,
    /// *Reserved (returns `NotSupported`).* TEST ONLY: grant a parked core to a guest without
    /// the policy's consent. In: RDI = core, RSI = guest id. Test hooks must be enabled.
    TestGrantCore = 0x80,
    /// *Reserved (returns `NotSupported`).* TEST ONLY: revoke a core from its owner. In: RDI =
    /// core, RSI = deadline in microseconds. Test hooks must be enabled.
    TestRevokeCore = 0x81,
}

impl Hypercall {
    pub const ALL: [Hypercall; 15] = [
        Self::Hello,
        Self::ConsoleWrite,
        Self::Doorbell,
        Self::WaitDoorbell,
        Self::CoreRelease,
        Self::CoreRequest,
        Self::LoadReportKick,
        Self::QueryCore,
        Self::CoreMove,
        Self::Stats,
        Self::SetPolicy,
        Self::Panic,
        Self::ForcedState,
        Self::TestGrantCore,
        Self::TestRevokeCore,
    ];

    /// Who may make this call.
    pub const fn privilege(self) -> Privilege {
        match self {
            Self::Hello | Self::QueryCore => Privilege::Any,
            Self::ConsoleWrite
            | Self::Doorbell
            | Self::WaitDoorbell
            | Self::CoreRelease
            | Self::CoreRequest
            | Self::LoadReportKick
            | Self::CoreMove
            | Self::Stats
            | Self::SetPolicy
            | Self::Panic
            | Self::ForcedState => Privilege::Kernel,
            Self::TestGrantCore | Self::TestRevokeCore => Privilege::Test,
        }
    }
}

impl TryFrom<u64> for Hypercall {
    type Error = Status;

    /// Unknown numbers map to [`Status::UnknownHypercall`], the status the guest gets back.
    #[inline]
    fn try_from(number: u64) -> Result<Self, Status> {
        Self::ALL
            .into_iter()
            .find(|call| *call as u64 == number)
            .ok_or(Status::UnknownHypercall)
    }
}

/// Status returned in RAX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Status {
    Ok = 0,
    UnknownHypercall = 1,
    /// The caller's CPL or holder token does not allow this call.
    PermissionDenied = 2,
    InvalidArgument = 3,
    /// The core number is not a core of this machine.
    InvalidCore = 4,
    /// The caller's guest does not own (or may never own) the core.
    NotOwner = 5,
    /// The core or doorbell is in a transition, or the hypervisor's console queue is full
    /// (`ConsoleWrite`, nothing taken); retry later.
    Busy = 6,
    TimedOut = 7,
    Interrupted = 8,
    /// The call is reserved: not implemented by this hypervisor (or its test hooks are off).
    NotSupported = 9,
}

impl Status {
    const ALL: [Status; 10] = [
        Self::Ok,
        Self::UnknownHypercall,
        Self::PermissionDenied,
        Self::InvalidArgument,
        Self::InvalidCore,
        Self::NotOwner,
        Self::Busy,
        Self::TimedOut,
        Self::Interrupted,
        Self::NotSupported,
    ];
}

/// RAX held a value that is no [`Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownStatus(pub u64);

impl fmt::Display for UnknownStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown hypercall status {:#x}", self.0)
    }
}

impl core::error::Error for UnknownStatus {}

impl TryFrom<u64> for Status {
    type Error = UnknownStatus;

    fn try_from(raw: u64) -> Result<Self, UnknownStatus> {
        Self::ALL
            .into_iter()
            .find(|status| *status as u64 == raw)
            .ok_or(UnknownStatus(raw))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl core::error::Error for Status {}

/// Mixed into [`hello_reply`] so a reply cannot be the argument echoed back by accident.
pub const HELLO_SALT: u64 = u64::from_le_bytes(*b"TANDEM!!");

/// What `HELLO` returns in RDI for argument `x`: depends on every bit of `x` and on the ABI
/// version, so a guest and a hypervisor built for different versions disagree on it.
pub const fn hello_reply(x: u64) -> u64 {
    x.rotate_left(17)
        ^ HELLO_SALT
        ^ (ABI_VERSION.to_u32() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Most bytes one `CONSOLE_WRITE` carries.
pub const CONSOLE_CHUNK_MAX: usize = 32;

/// The bytes of one `CONSOLE_WRITE`, packed into its argument registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleChunk {
    len: u8,
    bytes: [u8; CONSOLE_CHUNK_MAX],
}

impl ConsoleChunk {
    /// Takes up to [`CONSOLE_CHUNK_MAX`] bytes from the front of `text`; the caller loops over
    /// the rest.
    pub fn new(text: &[u8]) -> Self {
        let len = text.len().min(CONSOLE_CHUNK_MAX);
        let mut bytes = [0u8; CONSOLE_CHUNK_MAX];
        bytes[..len].copy_from_slice(&text[..len]);
        Self {
            len: len as u8,
            bytes,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Arguments 0..=4 (RDI, RSI, RDX, R10, R8).
    pub fn to_args(&self) -> [u64; 5] {
        let mut args = [u64::from(self.len), 0, 0, 0, 0];
        for (arg, chunk) in args[1..].iter_mut().zip(self.bytes.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            *arg = u64::from_le_bytes(word);
        }
        args
    }

    /// The hypervisor's side: rejects a count above 32 and bytes set past the count.
    pub fn from_args(args: [u64; 5]) -> Result<Self, Status> {
        let len = usize::try_from(args[0])
            .ok()
            .filter(|len| *len <= CONSOLE_CHUNK_MAX)
            .ok_or(Status::InvalidArgument)?;
        let mut bytes = [0u8; CONSOLE_CHUNK_MAX];
        for (chunk, arg) in bytes.chunks_exact_mut(8).zip(&args[1..]) {
            chunk.copy_from_slice(&arg.to_le_bytes());
        }
        if bytes[len..].iter().any(|byte| *byte != 0) {
            return Err(Status::InvalidArgument);
        }
        Ok(Self {
            len: len as u8,
            bytes,
        })
    }
}

/// The arguments of `CORE_RELEASE`: the core to release and, optionally, a core of the same
/// guest to send a fixed interrupt once the release is done. A leaving kernel that handed
/// threads to an idle core would otherwise wake it itself, and each IPI a guest sends is a VM
/// exit (the hypervisor checks and translates its ICR writes): on the way out that exit would
/// delay the release, while the hypervisor, already handling the call, sends it for the price
/// of one register write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreRelease {
    pub core: CoreId,
    pub wake: Option<Wake>,
}

/// A fixed interrupt the hypervisor sends for a guest (see [`CoreRelease`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wake {
    pub core: CoreId,
    /// 32..=255: vectors below 32 are the processor's exceptions (SDM Vol. 3A §6.3.1).
    pub vector: u8,
}

/// The lowest vector a fixed interrupt may carry (SDM Vol. 3A §6.3.1).
pub const FIRST_INTERRUPT_VECTOR: u8 = 32;

impl CoreRelease {
    /// Arguments 0..=4: RDI = core, RSI = core to wake, RDX = its vector (0: no wake).
    #[inline]
    pub fn to_args(&self) -> [u64; 5] {
        let (wake_core, vector) = self.wake.map_or((0, 0), |wake| {
            (wake.core.index() as u64, u64::from(wake.vector))
        });
        [self.core.index() as u64, wake_core, vector, 0, 0]
    }

    /// The hypervisor's side: rejects a core index out of range, a vector below 32 or above
    /// 255, a wake core given without a vector, and anything set in R10 or R8. Whether the
    /// cores belong to the caller is the hypervisor's check.
    #[inline]
    pub fn from_args(args: [u64; 5]) -> Result<Self, Status> {
        let [core, wake_core, vector, rest @ ..] = args;
        let core = CoreId::new(core).ok_or(Status::InvalidCore)?;
        if rest != [0, 0] {
            return Err(Status::InvalidArgument);
        }
        let wake = match vector {
            0 if wake_core == 0 => None,
            0 => return Err(Status::InvalidArgument),
            vector => {
                let vector = u8::try_from(vector)
                    .ok()
                    .filter(|vector| *vector >= FIRST_INTERRUPT_VECTOR)
                    .ok_or(Status::InvalidArgument)?;
                let core = CoreId::new(wake_core).ok_or(Status::InvalidCore)?;
                Some(Wake { core, vector })
            }
        };
        Ok(Self { core, wake })
    }
}

/// Most bytes of a `PANIC` message.
pub const PANIC_MESSAGE_MAX: usize = 256;

/// The arguments of `PANIC`: where the message lies in the guest's memory. The message is
/// copied by the hypervisor, which checks that it lies wholly in the guest's RAM and that its
/// text is fit to print ([`panic_text`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PanicMessage {
    /// Guest-physical address of the first byte.
    pub address: u64,
    /// 0..=[`PANIC_MESSAGE_MAX`].
    pub len: usize,
}

impl PanicMessage {
    /// Arguments 0..=4: RDI = address, RSI = length.
    pub fn to_args(&self) -> [u64; 5] {
        [self.address, self.len as u64, 0, 0, 0]
    }

    /// The hypervisor's side: rejects a length above [`PANIC_MESSAGE_MAX`], a message that
    /// would wrap around the address space, and anything set in RDX, R10 or R8.
    pub fn from_args(args: [u64; 5]) -> Result<Self, Status> {
        let [address, len, rest @ ..] = args;
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len <= PANIC_MESSAGE_MAX)
            .ok_or(Status::InvalidArgument)?;
        if rest != [0; 3] || address.checked_add(len as u64).is_none() {
            return Err(Status::InvalidArgument);
        }
        Ok(Self { address, len })
    }
}

/// The text of a panic message, if it is fit for the hypervisor's console as it is: printable
/// ASCII only (no line breaks or escape sequences, which would let the guest write lines of its
/// own there) and no `@@`, which could start a forged marker on the hypervisor's line.
/// `InvalidArgument` otherwise.
pub fn panic_text(bytes: &[u8]) -> Result<&str, Status> {
    let printable = bytes.iter().all(|byte| (0x20..0x7f).contains(byte));
    if !printable || bytes.windows(2).any(|pair| pair == b"@@") {
        return Err(Status::InvalidArgument);
    }
    core::str::from_utf8(bytes).map_err(|_| Status::InvalidArgument)
}

/// Size of [`ForcedState`] as `FORCED_STATE` writes it.
pub const FORCED_STATE_BYTES: usize = 8 * ForcedState::WORDS;

/// The registers of a vCPU when the hypervisor took its core by force (read with
/// `FORCED_STATE`): the general-purpose registers, RIP, RFLAGS and the CS and SS selectors
/// (whose low two bits give the privilege level it ran at). Nothing else is kept: the
/// extended (FPU/SSE) state, the control registers and the MSRs are scrubbed with the core.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForcedState {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cs: u64,
    pub ss: u64,
}

impl ForcedState {
    const WORDS: usize = 20;

    fn words(&self) -> [u64; Self::WORDS] {
        [
            self.rax,
            self.rbx,
            self.rcx,
            self.rdx,
            self.rsi,
            self.rdi,
            self.rbp,
            self.rsp,
            self.r8,
            self.r9,
            self.r10,
            self.r11,
            self.r12,
            self.r13,
            self.r14,
            self.r15,
            self.rip,
            self.rflags,
            self.cs,
            self.ss,
        ]
    }

    /// The layout `FORCED_STATE` writes: the fields in declaration order, 8 bytes each,
    /// little-endian.
    pub fn to_bytes(&self) -> [u8; FORCED_STATE_BYTES] {
        let mut bytes = [0u8; FORCED_STATE_BYTES];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(self.words()) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    pub fn from_bytes(bytes: &[u8; FORCED_STATE_BYTES]) -> Self {
        let mut words = [0u64; Self::WORDS];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(chunk);
            *word = u64::from_le_bytes(raw);
        }
        let [rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags, cs, ss] =
            words;
        Self {
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rbp,
            rsp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
            rip,
            rflags,
            cs,
            ss,
        }
    }

    /// The privilege level the vCPU ran at: the RPL of CS, which equals the CPL in 64-bit
    /// mode (SDM Vol. 3A §5.5).
    pub fn cpl(&self) -> u8 {
        (self.cs & 3) as u8
    }

    /// Whether it could take maskable interrupts then: RFLAGS.IF (bit 9, SDM Vol. 1 §3.4.3).
    pub fn interrupts_enabled(&self) -> bool {
        self.rflags & (1 << 9) != 0
    }
}

/// The arguments of `FORCED_STATE`: the core whose state to read and where to write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForcedStateRequest {
    pub core: CoreId,
    /// Guest-physical address of a [`FORCED_STATE_BYTES`]-byte buffer.
    pub buffer: u64,
}

impl ForcedStateRequest {
    /// Arguments 0..=4: RDI = core, RSI = buffer.
    pub fn to_args(&self) -> [u64; 5] {
        [self.core.index() as u64, self.buffer, 0, 0, 0]
    }

    /// The hypervisor's side: rejects a core index out of range (`InvalidCore`), a buffer
    /// that would wrap around the address space and anything set in RDX, R10 or R8
    /// (`InvalidArgument`). Whether the buffer lies in the guest's RAM is the hypervisor's
    /// check.
    pub fn from_args(args: [u64; 5]) -> Result<Self, Status> {
        let [core, buffer, rest @ ..] = args;
        let core = CoreId::new(core).ok_or(Status::InvalidCore)?;
        if rest != [0; 3] || buffer.checked_add(FORCED_STATE_BYTES as u64).is_none() {
            return Err(Status::InvalidArgument);
        }
        Ok(Self { core, buffer })
    }
}

/// State of a physical core, as `QUERY_CORE` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreState {
    /// Owned by a guest and scheduling.
    Owned = 1,
    /// Owned, asked to release, deadline running.
    Releasing = 2,
    /// In the hypervisor's free pool.
    Parked = 3,
    /// Handed to a guest that has not brought it online yet.
    Granted = 4,
}

/// Owner and state of one core. Packed as `state | owner << 8` (owner = guest id, 0xff = none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreOwnership {
    pub core: CoreId,
    pub state: CoreState,
    /// Guest id, `None` while parked.
    pub owner: Option<u8>,
}

const NO_OWNER: u64 = 0xff;

impl CoreOwnership {
    pub fn to_u64(&self) -> u64 {
        let owner = self.owner.map_or(NO_OWNER, u64::from);
        self.state as u64 | owner << 8 | (self.core.index() as u64) << 16
    }

    pub fn from_u64(raw: u64) -> Result<Self, Status> {
        let state = match raw & 0xff {
            1 => CoreState::Owned,
            2 => CoreState::Releasing,
            3 => CoreState::Parked,
            4 => CoreState::Granted,
            _ => return Err(Status::InvalidArgument),
        };
        let owner = match (raw >> 8) & 0xff {
            NO_OWNER => None,
            guest => Some(guest as u8),
        };
        let core = CoreId::new((raw >> 16) & 0xff).ok_or(Status::InvalidCore)?;
        if raw >> 24 != 0 || (state == CoreState::Parked) != owner.is_none() {
            return Err(Status::InvalidArgument);
        }
        Ok(Self { core, state, owner })
    }
}

/// Registers a hypercall returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypercallResult {
    pub results: [u64; 2],
}

/// Issues a hypercall from a Tandem guest: `args` go to RDI, RSI, RDX, R10, R8 and `token` to R9.
/// Returns RDI and RSI when RAX is [`Status::Ok`], the failure otherwise.
///
/// # Safety
/// Must run inside a Tandem guest: outside VMX non-root operation `VMCALL` raises #UD.
/// `CoreRelease` on the current core does not return; the caller must have drained the core.
#[cfg(target_arch = "x86_64")]
pub unsafe fn vmcall(
    call: Hypercall,
    args: [u64; 5],
    token: u64,
) -> Result<HypercallResult, HypercallFailure> {
    let status: u64;
    let result0: u64;
    let result1: u64;
    // SAFETY: the caller guarantees we run as a Tandem guest, where VMCALL is defined. The
    // hypervisor reads and writes only the registers declared here and never guest memory. The
    // asm is deliberately not `nomem`: it is a compiler barrier, so shared-memory accesses are not
    // moved across a doorbell or a wait.
    unsafe {
        core::arch::asm!(
            "vmcall",
            inlateout("rax") call as u64 => status,
            inlateout("rdi") args[0] => result0,
            inlateout("rsi") args[1] => result1,
            in("rdx") args[2],
            in("r10") args[3],
            in("r8") args[4],
            in("r9") token,
            options(nostack),
        );
    }
    match Status::try_from(status) {
        Ok(Status::Ok) => Ok(HypercallResult {
            results: [result0, result1],
        }),
        Ok(error) => Err(HypercallFailure::Status(error)),
        Err(unknown) => Err(HypercallFailure::Unknown(unknown)),
    }
}

/// A hypercall did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallFailure {
    Status(Status),
    /// RAX held no known status: the hypervisor speaks another ABI.
    Unknown(UnknownStatus),
}

/// Convenience for the common check: the hello round trip agrees with this build.
pub fn hello_matches(argument: u64, result: HypercallResult) -> bool {
    result.results == [hello_reply(argument), u64::from(ABI_VERSION.to_u32())]
}
