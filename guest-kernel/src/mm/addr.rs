//! Typed physical addresses and page frame numbers, so no bare `u64` crosses
//! a module boundary in the memory manager.

use guest_abi::PAGE_SIZE;

/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = PAGE_SIZE.trailing_zeros();

/// A guest-physical byte address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysAddr(pub u64);

/// A page frame number: a physical address divided by [`PAGE_SIZE`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pfn(pub u64);

impl PhysAddr {
    /// The raw address.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The frame holding this address (rounds down).
    pub const fn pfn_down(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }

    /// The first frame starting at or after this address (rounds up).
    pub const fn pfn_up(self) -> Pfn {
        Pfn(self.0.div_ceil(PAGE_SIZE))
    }
}

impl Pfn {
    /// The raw frame number.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The first byte of the frame.
    pub const fn addr(self) -> PhysAddr {
        PhysAddr(self.0 << PAGE_SHIFT)
    }

    /// The frame `n` frames further.
    pub const fn add(self, n: u64) -> Pfn {
        Pfn(self.0 + n)
    }
}

/// A half-open guest-physical range `[start, end)`, as the caller describes
/// RAM (from e820) and reserved memory (kernel image, boot data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhysRange {
    /// First byte.
    pub start: PhysAddr,
    /// One past the last byte.
    pub end: PhysAddr,
}

impl PhysRange {
    /// The range `[start, start + len)` (saturating at the top of the address space).
    pub const fn from_len(start: u64, len: u64) -> PhysRange {
        PhysRange {
            start: PhysAddr(start),
            end: PhysAddr(start.saturating_add(len)),
        }
    }

    /// Length in bytes (0 for an inverted range).
    pub const fn len(&self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }

    /// Whether the range holds no byte.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// As the VMM contract's range type.
    pub const fn to_gpa(self) -> guest_abi::GpaRange {
        guest_abi::GpaRange {
            start: self.start.0,
            len: self.len(),
        }
    }
}

/// A half-open range of frames `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PfnRange {
    /// First frame.
    pub start: Pfn,
    /// One past the last frame.
    pub end: Pfn,
}

impl PfnRange {
    /// Number of frames (0 for an inverted range).
    pub const fn pages(&self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }

    /// Whether `pfn` lies in the range.
    pub const fn contains(&self, pfn: Pfn) -> bool {
        self.start.0 <= pfn.0 && pfn.0 < self.end.0
    }

    /// The frames wholly inside `r` (RAM: partial pages at the edges are dropped).
    pub const fn inner(r: PhysRange) -> PfnRange {
        PfnRange {
            start: r.start.pfn_up(),
            end: r.end.pfn_down(),
        }
    }

    /// The frames touching `r` (reserved memory: partial pages count as reserved).
    pub const fn outer(r: PhysRange) -> PfnRange {
        PfnRange {
            start: r.start.pfn_down(),
            end: r.end.pfn_up(),
        }
    }

    /// As a byte range.
    pub const fn to_phys(self) -> PhysRange {
        PhysRange {
            start: self.start.addr(),
            end: self.end.addr(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_keeps_ram_inside_and_reserved_outside() {
        let r = PhysRange::from_len(0x1800, 0x2000); // 0x1800..0x3800
        assert_eq!(
            PfnRange::inner(r),
            PfnRange {
                start: Pfn(2),
                end: Pfn(3)
            }
        );
        assert_eq!(
            PfnRange::outer(r),
            PfnRange {
                start: Pfn(1),
                end: Pfn(4)
            }
        );
        assert_eq!(Pfn(3).addr(), PhysAddr(0x3000));
        assert_eq!(
            PhysRange::from_len(u64::MAX - 1, 10).end,
            PhysAddr(u64::MAX)
        );
    }
}
