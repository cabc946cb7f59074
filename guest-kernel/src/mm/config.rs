//! How the memory manager is configured ([`MmConfig`]), and why setting it
//! up can fail ([`MmConfigError`], [`MmInitError`]).

use core::fmt;

use guest_abi::{Reclaim, Strategy, DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE, SECTION_SIZE};

/// Largest section allowed (the memmap of a section must fit in the section
/// with `memmap_on_memory`).
pub const MAX_SECTION_SIZE: u64 = 1 << 30;

/// How the memory manager lays out and initializes the memmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmConfig {
    /// When struct pages are initialized.
    pub strategy: Strategy,
    /// Memory covered by one init chunk (a bit of the init bitmap): a power of
    /// two from [`MIN_CHUNK_SIZE`] to `section_bytes`.
    pub chunk_bytes: u64,
    /// Memory covered by one memmap section: a power of two from
    /// `chunk_bytes` to [`MAX_SECTION_SIZE`].
    pub section_bytes: u64,
    /// Put each section's memmap in the section itself instead of one array
    /// in low memory.
    pub memmap_on_memory: bool,
    /// Low watermark, in pages. While memory is still uninitialized, an
    /// allocation that had to split a larger block (its own free list was
    /// empty: the lists are running short) and leaves fewer free pages than
    /// this initializes one more chunk before it returns, so the next
    /// allocations find pages without growing. An allocation served from its
    /// own list never looks at it: the fast path pays nothing for on-demand
    /// initialization. 0 (the default) grows only when a request cannot be
    /// served, which keeps `OnDemand` at its minimum footprint.
    pub low_watermark_pages: u64,
    /// What [`MemoryManager::reclaim`](super::MemoryManager::reclaim) gives
    /// back to the host (see [`super::reclaim`]): `Off` (the default)
    /// nothing, `Data` free chunks' data, `Full` also returns free chunks to
    /// uninitialized (only with `OnDemand`).
    pub reclaim: Reclaim,
    /// With `Full`: free pages a reclaim pass leaves initialized (the
    /// reserve, so alloc/free churn does not de-initialize and
    /// re-initialize chunks). Their data is still reported.
    pub reclaim_reserve_pages: u64,
}

impl MmConfig {
    /// The default layout (2 MiB chunks, 128 MiB sections, memmap in low
    /// memory, no watermark) with the given strategy.
    pub const fn new(strategy: Strategy) -> MmConfig {
        MmConfig {
            strategy,
            chunk_bytes: DEFAULT_CHUNK_SIZE,
            section_bytes: SECTION_SIZE,
            memmap_on_memory: false,
            low_watermark_pages: 0,
            reclaim: Reclaim::Off,
            reclaim_reserve_pages: 0,
        }
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), MmConfigError> {
        if !self.chunk_bytes.is_power_of_two() {
            return Err(MmConfigError::ChunkNotPowerOfTwo);
        }
        if self.chunk_bytes < MIN_CHUNK_SIZE {
            return Err(MmConfigError::ChunkTooSmall);
        }
        if !self.section_bytes.is_power_of_two() {
            return Err(MmConfigError::SectionNotPowerOfTwo);
        }
        if self.section_bytes > MAX_SECTION_SIZE {
            return Err(MmConfigError::SectionTooLarge);
        }
        if self.chunk_bytes > self.section_bytes {
            return Err(MmConfigError::ChunkLargerThanSection);
        }
        if self.reclaim == Reclaim::Full && self.strategy != Strategy::OnDemand {
            return Err(MmConfigError::FullReclaimNeedsOnDemand);
        }
        Ok(())
    }
}

/// An invalid [`MmConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmConfigError {
    /// `chunk_bytes` is not a power of two.
    ChunkNotPowerOfTwo,
    /// `chunk_bytes` is below [`MIN_CHUNK_SIZE`].
    ChunkTooSmall,
    /// `chunk_bytes` is larger than `section_bytes`.
    ChunkLargerThanSection,
    /// `section_bytes` is not a power of two.
    SectionNotPowerOfTwo,
    /// `section_bytes` is above [`MAX_SECTION_SIZE`].
    SectionTooLarge,
    /// `reclaim` is `Full` but the strategy is not `OnDemand` (the others
    /// initialize every chunk by design).
    FullReclaimNeedsOnDemand,
}

impl fmt::Display for MmConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MmConfigError::ChunkNotPowerOfTwo => "chunk size must be a power of two",
            MmConfigError::ChunkTooSmall => "chunk size must be at least 128 KiB",
            MmConfigError::ChunkLargerThanSection => "chunk size must not exceed the section size",
            MmConfigError::SectionNotPowerOfTwo => "section size must be a power of two",
            MmConfigError::SectionTooLarge => "section size must be at most 1 GiB",
            MmConfigError::FullReclaimNeedsOnDemand => {
                "reclaim=full needs the ondemand strategy"
            }
        })
    }
}

/// Why [`MemoryManager::init`](super::MemoryManager::init) failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmInitError {
    /// The configuration is invalid.
    Config(MmConfigError),
    /// `init` was already called on this manager.
    AlreadyInitialized,
    /// No whole page of RAM was given.
    NoRam,
    /// More than [`MAX_RANGES`](super::memmap::MAX_RANGES) RAM or reserved ranges were given.
    TooManyRanges,
    /// RAM extends above [`MAX_PHYS_BYTES`](super::memmap::MAX_PHYS_BYTES).
    RamTooLarge,
    /// RAM spans more than [`MAX_SECTIONS`](super::memmap::MAX_SECTIONS) sections.
    TooManySections,
    /// No unreserved RAM is large enough to hold the memmap where it must go.
    MemmapDoesNotFit,
}

impl fmt::Display for MmInitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmInitError::Config(e) => write!(f, "invalid memory configuration: {e}"),
            MmInitError::AlreadyInitialized => f.write_str("memory manager already initialized"),
            MmInitError::NoRam => f.write_str("no usable RAM"),
            MmInitError::TooManyRanges => f.write_str("too many memory ranges (at most 64)"),
            MmInitError::RamTooLarge => f.write_str("RAM above 128 GiB is not supported"),
            MmInitError::TooManySections => {
                f.write_str("too many sections; use a larger section size")
            }
            MmInitError::MemmapDoesNotFit => f.write_str("no free RAM large enough for the memmap"),
        }
    }
}

impl From<MmConfigError> for MmInitError {
    fn from(e: MmConfigError) -> MmInitError {
        MmInitError::Config(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_problem() {
        let ok = MmConfig::new(Strategy::OnDemand);
        assert_eq!(ok.validate(), Ok(()));
        let c = |chunk, section| MmConfig {
            chunk_bytes: chunk,
            section_bytes: section,
            ..ok
        };
        assert_eq!(
            c(3 << 20, SECTION_SIZE).validate(),
            Err(MmConfigError::ChunkNotPowerOfTwo)
        );
        assert_eq!(
            c(64 << 10, SECTION_SIZE).validate(),
            Err(MmConfigError::ChunkTooSmall)
        );
        assert_eq!(
            c(256 << 20, SECTION_SIZE).validate(),
            Err(MmConfigError::ChunkLargerThanSection)
        );
        assert_eq!(
            c(2 << 20, 96 << 20).validate(),
            Err(MmConfigError::SectionNotPowerOfTwo)
        );
        assert_eq!(
            c(2 << 20, 2 << 30).validate(),
            Err(MmConfigError::SectionTooLarge)
        );
        assert_eq!(c(MIN_CHUNK_SIZE, MIN_CHUNK_SIZE).validate(), Ok(()));
        for s in Strategy::ALL {
            let full = MmConfig {
                reclaim: Reclaim::Full,
                ..MmConfig::new(s)
            };
            let want = if s == Strategy::OnDemand {
                Ok(())
            } else {
                Err(MmConfigError::FullReclaimNeedsOnDemand)
            };
            assert_eq!(full.validate(), want, "{s:?}");
            let data = MmConfig {
                reclaim: Reclaim::Data,
                ..MmConfig::new(s)
            };
            assert_eq!(data.validate(), Ok(()), "{s:?}");
        }
        assert_eq!(c(SECTION_SIZE, SECTION_SIZE).validate(), Ok(()));
        let e = MmInitError::from(MmConfigError::ChunkTooSmall);
        assert_eq!(
            std::format!("{e}"),
            "invalid memory configuration: chunk size must be at least 128 KiB"
        );
    }
}
