//! The kernel's boot configuration, parsed from its command line.
//!
//! | word | meaning | default |
//! | --- | --- | --- |
//! | `cpl=0\|3` | run the kernel in ring 0, or deprivileged in ring 3 | `3` |
//! | `workload=...` | `wait`, `exit`, `panic`, `fault`, `exception`, `alloc:SIZE`, `corrupt-stats`, `corrupt-stats-addr`, or an [`Attack`] (`attack-...`) | `wait` |
//! | `memmap_init=...` | `eager`, `parallel`, `deferred`, `ondemand` | `ondemand` |
//! | `memmap_chunk=SIZE` | memory per memmap chunk, 128K .. one section, power of two | `2M` |
//! | `memmap_on_memory=on\|off` | each section's memmap at its start | `off` |
//! | `quiet` | no console output but panics | off |

use crate::cmdline::{get, parse_size};
use guest_abi::Strategy;

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
}

impl Attack {
    /// The attack named `v` (the value of `workload=`).
    fn parse(v: &str) -> Option<Attack> {
        Some(match v {
            "attack-ports" => Attack::Ports,
            "attack-serial-flood" => Attack::SerialFlood,
            "attack-mailbox-silent" => Attack::MailboxSilent,
            "attack-held-max" => Attack::HeldMax,
            "attack-spin" => Attack::Spin,
            "attack-mmio" => Attack::Mmio,
            "attack-exceptions" => Attack::Exceptions,
            "attack-memory-bomb" => Attack::MemoryBomb,
            "attack-race" => Attack::Race,
            "attack-exception-all" => Attack::ExceptionAll,
            "attack-fault-all" => Attack::FaultAll,
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
        if let Some(v) = get(cmdline, "memmap_init") {
            c.strategy = Strategy::from_name(v).ok_or(ConfigError { key: "memmap_init" })?;
        }
        if let Some(v) = get(cmdline, "memmap_chunk") {
            c.chunk_bytes = parse_size(v)
                .filter(|n| n.is_power_of_two())
                .filter(|n| (guest_abi::MIN_CHUNK_SIZE..=guest_abi::SECTION_SIZE).contains(n))
                .ok_or(ConfigError {
                    key: "memmap_chunk",
                })?;
        }
        if let Some(v) = get(cmdline, "memmap_on_memory") {
            c.memmap_on_memory = match v {
                "on" | "1" | "" => true,
                "off" | "0" => false,
                _ => {
                    return Err(ConfigError {
                        key: "memmap_on_memory",
                    })
                }
            };
        }
        c.quiet = get(cmdline, "quiet").is_some();
        Ok(c)
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
    }

    #[test]
    fn attacks_are_named_workloads() {
        for (v, a) in [
            ("attack-ports", Attack::Ports),
            ("attack-serial-flood", Attack::SerialFlood),
            ("attack-mailbox-silent", Attack::MailboxSilent),
            ("attack-held-max", Attack::HeldMax),
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
        assert_eq!(
            Config::parse("memmap_on_memory=maybe"),
            Err(ConfigError {
                key: "memmap_on_memory"
            })
        );
    }
}
