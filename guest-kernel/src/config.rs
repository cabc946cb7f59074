//! The kernel's boot configuration, parsed from its command line.
//!
//! | word | meaning | default |
//! | --- | --- | --- |
//! | `cpl=0\|3` | run the kernel in ring 0, or deprivileged in ring 3 | `3` |
//! | `workload=...` | `wait`, `exit`, `panic`, `fault`, `exception`, `alloc:SIZE`, `corrupt-stats`, `corrupt-stats-addr`, or an [`Attack`] (`attack-...`) | `wait` |
//! | `memmap_init=...` | `eager`, `parallel`, `deferred`, `ondemand` | `ondemand` |
//! | `memmap_chunk=SIZE` | memory per memmap chunk, 128K .. one section, power of two | `2M` |
//! | `memmap_on_memory=on\|off` | each section's memmap at its start | `off` |
//! | `reclaim=off\|data\|full` | what freed memory goes back to the host (see [`Config::reclaim_mode`]) | `full` with `ondemand`, else `off` |
//! | `reclaim_delay_ms=N` | how long memory stays free before it is reported, 1 .. 60000 | `2000` |
//! | `reclaim_reserve=SIZE` | free memory `reclaim=full` keeps initialized | `4M` |
//! | `quiet` | no console output but panics | off |

use crate::cmdline::{get, parse_size};
use guest_abi::{Reclaim, Strategy, DEFAULT_RECLAIM_DELAY_MS, MAX_WAIT_TIMEOUT_MS};

/// Default `reclaim_reserve=`: two default chunks stay initialized after a
/// `reclaim=full` pass (their data is still reported), so small alloc/free
/// churn does not de-initialize and re-initialize chunks.
pub const DEFAULT_RECLAIM_RESERVE: u64 = 4 << 20;

/// What the kernel does once it is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Serve commands from the VMM's mailbox (shut down if there is no VMM channel).
    Wait,
    /// Shut down cleanly with exit code 0.
    Exit,
    /// Panic (tests the panic path).
    Panic,
    /// Triple-fault (tests the VMM's handling of a guest that dies).
    Fault,
    /// Raise an invalid-opcode exception (tests the exception report).
    Exception,
    /// Allocate and write this many bytes, then wait.
    Alloc(u64),
    /// Write garbage into the stats block, then wait (tests the VMM's validation).
    CorruptStats,
    /// Announce a stats block address outside RAM, then wait.
    CorruptStatsAddr,
    /// Write to the last page of RAM without onlining its block (tests the
    /// VMM's refusal of RAM the guest never asked for).
    TouchOffline,
    /// Behave like a hostile guest (the VMM's hostile-guest tests).
    Attack(Attack),
}

/// What a hostile guest does once it is ready (`workload=attack-...`); the
/// VMM must stay responsive, bounded and stoppable whatever it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// `attack-ports`: write bad values to every paravirtual port but the
    /// exit and exception ports, forever.
    Ports,
    /// `attack-serial-flood`: write to COM1 forever, never waiting for the
    /// transmitter.
    SerialFlood,
    /// `attack-mailbox-silent`: take every command, answer none.
    MailboxSilent,
    /// `attack-held-max`: answer every command with `held_bytes` = u64::MAX
    /// (a shutdown still shuts down).
    HeldMax,
    /// `attack-shutdown-ignored`: answer every command, the shutdown too,
    /// with `Ok`, and never exit.
    ShutdownIgnored,
    /// `attack-spin`: loop forever in the kernel, never exiting to the VMM.
    Spin,
    /// `attack-exit:N`: exit with code N at once.
    Exit(u32),
    /// `attack-mmio`: read and write guest-physical addresses that are not
    /// RAM (just past RAM, the 32-bit hole, the top of the physical address
    /// space, a write straddling the end of RAM), check that reads see all
    /// ones and writes are dropped, then keep doing it forever.
    Mmio,
    /// `attack-exceptions`: install handlers that resume, then raise #UD,
    /// #GP, #PF, #DE and #BP in a loop forever (ring 3, handled in ring 0).
    Exceptions,
    /// `attack-mem-online:N`: on every vCPU at once, `port::MEM_ONLINE`
    /// for addresses outside RAM, misaligned ones, every block of RAM, and
    /// the same block N times; then serve commands.
    MemOnline(u32),
    /// `attack-memory-bomb`: online all RAM, then write every page of it on
    /// every vCPU, over and over.
    MemoryBomb,
    /// `attack-race`: the boot CPU serves commands while every other vCPU
    /// hammers the paravirtual ports (stale and future `DONE`s, mailbox and
    /// stats re-announcements, AP start-up, park and release out of order,
    /// repeated phases, command polls it never answers).
    Race,
    /// `attack-exit-all:N`: every vCPU writes the exit port at once, CPU
    /// `i` with code N + i.
    ExitAll(u32),
    /// `attack-exception-all`: every vCPU raises #UD at once (reported by
    /// the kernel's handlers).
    ExceptionAll,
    /// `attack-fault-all`: every vCPU triple-faults at once (empty IDT).
    FaultAll,
    /// `attack-reclaim`: send bogus `port::RECLAIM` records (bad magic,
    /// version, count and address; ranges outside RAM, unaligned, empty,
    /// overflowing, overlapping, over the kernel, the stats block, the boot
    /// data and the memmap) and one range over memory the guest uses; check
    /// that only that range was lost; then serve commands.
    Reclaim,
}

impl Attack {
    /// The attack named `v` (the value of `workload=`).
    fn parse(v: &str) -> Option<Attack> {
        Some(match v {
            "attack-ports" => Attack::Ports,
            "attack-serial-flood" => Attack::SerialFlood,
            "attack-mailbox-silent" => Attack::MailboxSilent,
            "attack-held-max" => Attack::HeldMax,
            "attack-shutdown-ignored" => Attack::ShutdownIgnored,
            "attack-spin" => Attack::Spin,
            "attack-mmio" => Attack::Mmio,
            "attack-exceptions" => Attack::Exceptions,
            "attack-memory-bomb" => Attack::MemoryBomb,
            "attack-race" => Attack::Race,
            "attack-exception-all" => Attack::ExceptionAll,
            "attack-fault-all" => Attack::FaultAll,
            "attack-reclaim" => Attack::Reclaim,
            _ => {
                let (name, n) = v.split_once(':')?;
                let n = n.parse().ok()?;
                match name {
                    "attack-exit" => Attack::Exit(n),
                    "attack-exit-all" => Attack::ExitAll(n),
                    "attack-mem-online" => Attack::MemOnline(n),
                    _ => return None,
                }
            }
        })
    }
}

/// Boot configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub cpl: u8,
    pub workload: Workload,
    pub strategy: Strategy,
    pub chunk_bytes: u64,
    pub memmap_on_memory: bool,
    /// `reclaim=` as given; `None` takes the strategy's default
    /// ([`Config::reclaim_mode`]).
    pub reclaim: Option<Reclaim>,
    pub reclaim_delay_ms: u32,
    pub reclaim_reserve_bytes: u64,
    pub quiet: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cpl: 3,
            workload: Workload::Wait,
            strategy: Strategy::OnDemand,
            chunk_bytes: guest_abi::DEFAULT_CHUNK_SIZE,
            memmap_on_memory: false,
            reclaim: None,
            reclaim_delay_ms: DEFAULT_RECLAIM_DELAY_MS,
            reclaim_reserve_bytes: DEFAULT_RECLAIM_RESERVE,
            quiet: false,
        }
    }
}

/// A word of the command line the kernel could not use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: &'static str,
}

impl Config {
    /// Parses the command line. Unknown words are ignored (they may be meant
    /// for someone else); a known word with a bad value is an error.
    pub fn parse(cmdline: &str) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        if let Some(v) = get(cmdline, "cpl") {
            c.cpl = match v {
                "0" => 0,
                "3" => 3,
                _ => return Err(ConfigError { key: "cpl" }),
            };
        }
        if let Some(v) = get(cmdline, "workload") {
            c.workload = match v {
                "wait" => Workload::Wait,
                "exit" => Workload::Exit,
                "panic" => Workload::Panic,
                "fault" => Workload::Fault,
                "exception" => Workload::Exception,
                "corrupt-stats" => Workload::CorruptStats,
                "corrupt-stats-addr" => Workload::CorruptStatsAddr,
                "touch-offline" => Workload::TouchOffline,
                _ => match (v.strip_prefix("alloc:").and_then(parse_size), Attack::parse(v)) {
                    (Some(n), _) => Workload::Alloc(n),
                    (None, Some(a)) => Workload::Attack(a),
                    (None, None) => return Err(ConfigError { key: "workload" }),
                },
            };
        }
        // The memmap words are read by the contract's rules, as the VMM
        // reads them to compute this kernel's memmap layout.
        (c.strategy, c.chunk_bytes, c.memmap_on_memory) =
            guest_abi::cmdline::memmap_words(cmdline).map_err(|key| ConfigError { key })?;
        if let Some(v) = get(cmdline, "reclaim") {
            c.reclaim = Some(Reclaim::from_name(v).ok_or(ConfigError { key: "reclaim" })?);
        }
        if let Some(v) = get(cmdline, "reclaim_delay_ms") {
            c.reclaim_delay_ms = v
                .parse()
                .ok()
                .filter(|ms| (1..=MAX_WAIT_TIMEOUT_MS).contains(ms))
                .ok_or(ConfigError {
                    key: "reclaim_delay_ms",
                })?;
        }
        if let Some(v) = get(cmdline, "reclaim_reserve") {
            c.reclaim_reserve_bytes = parse_size(v).ok_or(ConfigError {
                key: "reclaim_reserve",
            })?;
        }
        c.quiet = get(cmdline, "quiet").is_some();
        Ok(c)
    }

    /// The reclaim mode the kernel runs, and whether it is not the one
    /// asked for. Without `reclaim=`: `full` with `ondemand`, `off` with the
    /// other strategies (today's behaviour; they support `data` when asked).
    /// `reclaim=full` with another strategy is downgraded to `data` (their
    /// memmap is initialized by design, so only data can go back; the
    /// kernel says so on the console) rather than refusing to boot.
    pub fn reclaim_mode(&self) -> (Reclaim, bool) {
        match (self.reclaim, self.strategy) {
            (None, Strategy::OnDemand) => (Reclaim::Full, false),
            (None, _) => (Reclaim::Off, false),
            (Some(Reclaim::Full), s) if s != Strategy::OnDemand => (Reclaim::Data, true),
            (Some(r), _) => (r, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_command_line_gives_defaults() {
        assert_eq!(Config::parse(""), Ok(Config::default()));
    }

    #[test]
    fn every_word_is_understood() {
        let c = Config::parse(
            "console=ttyS0 cpl=0 workload=alloc:256M memmap_init=eager memmap_chunk=128K memmap_on_memory=on quiet",
        )
        .unwrap();
        assert_eq!(c.cpl, 0);
        assert_eq!(c.workload, Workload::Alloc(256 << 20));
        assert_eq!(c.strategy, Strategy::Eager);
        assert_eq!(c.chunk_bytes, 128 << 10);
        assert!(c.memmap_on_memory);
        assert!(c.quiet);
        let r = Config::parse("reclaim=data reclaim_delay_ms=500 reclaim_reserve=8M").unwrap();
        assert_eq!(
            (r.reclaim, r.reclaim_delay_ms, r.reclaim_reserve_bytes),
            (Some(Reclaim::Data), 500, 8 << 20)
        );
    }

    #[test]
    fn reclaim_defaults_to_full_for_ondemand_and_full_is_downgraded_elsewhere() {
        let mode = |cmdline: &str| Config::parse(cmdline).unwrap().reclaim_mode();
        assert_eq!(mode(""), (Reclaim::Full, false));
        assert_eq!(Config::default().reclaim_delay_ms, DEFAULT_RECLAIM_DELAY_MS);
        for s in ["eager", "parallel", "deferred"] {
            assert_eq!(mode(&format!("memmap_init={s}")), (Reclaim::Off, false), "{s}");
            assert_eq!(mode(&format!("memmap_init={s} reclaim=data")), (Reclaim::Data, false), "{s}");
            assert_eq!(mode(&format!("memmap_init={s} reclaim=full")), (Reclaim::Data, true), "{s}");
        }
        assert_eq!(mode("reclaim=off"), (Reclaim::Off, false));
        assert_eq!(mode("reclaim=data"), (Reclaim::Data, false));
        assert_eq!(mode("reclaim=full"), (Reclaim::Full, false));
    }

    #[test]
    fn attacks_are_named_workloads() {
        for (v, a) in [
            ("attack-ports", Attack::Ports),
            ("attack-serial-flood", Attack::SerialFlood),
            ("attack-mailbox-silent", Attack::MailboxSilent),
            ("attack-held-max", Attack::HeldMax),
            ("attack-shutdown-ignored", Attack::ShutdownIgnored),
            ("attack-spin", Attack::Spin),
            ("attack-exit:134", Attack::Exit(134)),
            ("attack-mmio", Attack::Mmio),
            ("attack-exceptions", Attack::Exceptions),
            ("attack-mem-online:1000", Attack::MemOnline(1000)),
            ("attack-memory-bomb", Attack::MemoryBomb),
            ("attack-race", Attack::Race),
            ("attack-exit-all:10", Attack::ExitAll(10)),
            ("attack-exception-all", Attack::ExceptionAll),
            ("attack-fault-all", Attack::FaultAll),
            ("attack-reclaim", Attack::Reclaim),
        ] {
            assert_eq!(Config::parse(&format!("workload={v}")).unwrap().workload, Workload::Attack(a), "{v}");
        }
        for bad in ["attack-exit:", "attack-exit:x", "attack-everything", "attack-mem-online", "attack-mmio:1", "attack-exit-all:-1"] {
            assert_eq!(Config::parse(&format!("workload={bad}")), Err(ConfigError { key: "workload" }), "{bad}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(Config::parse("cpl=1"), Err(ConfigError { key: "cpl" }));
        assert_eq!(
            Config::parse("workload=sleep"),
            Err(ConfigError { key: "workload" })
        );
        assert_eq!(
            Config::parse("memmap_init=lazy"),
            Err(ConfigError { key: "memmap_init" })
        );
        assert_eq!(
            Config::parse("memmap_chunk=3M"),
            Err(ConfigError {
                key: "memmap_chunk"
            })
        );
        assert_eq!(
            Config::parse("memmap_chunk=64K"),
            Err(ConfigError {
                key: "memmap_chunk"
            })
        );
        assert_eq!(
            Config::parse("memmap_chunk=256M"),
            Err(ConfigError {
                key: "memmap_chunk"
            })
        );
        for bad in ["reclaim=all", "reclaim_delay_ms=0", "reclaim_delay_ms=60001", "reclaim_delay_ms=2s", "reclaim_reserve=x"] {
            let key = bad.split('=').next().unwrap();
            assert_eq!(Config::parse(bad).map_err(|e| e.key), Err(key), "{bad}");
        }
        assert_eq!(
            Config::parse("memmap_on_memory=maybe"),
            Err(ConfigError {
                key: "memmap_on_memory"
            })
        );
    }
}
