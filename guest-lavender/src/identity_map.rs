//! Planning Lavender's identity map: which pages, of which size and access, cover its memory.
//!
//! Lavender maps exactly the guest-physical ranges the boot-info page gives it (its memory and
//! its shared regions), virtual == physical. Ranges are sorted and adjacent ranges with the same
//! access merged first, so a 2 MiB page is used wherever 2 MiB of aligned memory with one access
//! is owned, even across region boundaries, and 4 KiB pages elsewhere. A 2 MiB page is never used
//! where even part of it is not Lavender's: the hypervisor's EPT would refuse those addresses
//! anyway, but Lavender's own tables should not claim them.
//!
//! The first page (guest-physical 0) is left unmapped so a null-pointer access faults.

/// 4 KiB.
pub const SMALL_PAGE: u64 = 4096;
/// 2 MiB: a PDE with PS = 1 (Intel SDM Vol. 3A §4.5, Table 4-17).
pub const LARGE_PAGE: u64 = 2 << 20;
/// Memory regions plus shared regions of a boot-info page.
pub const MAX_RANGES: usize =
    vmcall_proto::bootinfo::MAX_MEMORY_REGIONS + vmcall_proto::bootinfo::MAX_SHARED_REGIONS;

/// What a mapping allows besides reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Writable and executable: the loaded kernel image (its sections are not yet told apart).
    Code,
    /// Writable, never executed (NX).
    Data,
}

/// A guest-physical range `start..end` to identity-map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
    pub access: Access,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    Small,
    Large,
}

impl PageSize {
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Small => SMALL_PAGE,
            Self::Large => LARGE_PAGE,
        }
    }
}

/// One page of the plan: maps virtual `start` to physical `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageMapping {
    pub start: u64,
    pub size: PageSize,
    pub access: Access,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanError {
    TooManyRanges,
    /// A range does not start and end on 4 KiB boundaries.
    Misaligned(Range),
    /// Two ranges share memory.
    Overlap(Range, Range),
}

/// Sorted, disjoint, merged ranges to identity-map.
#[derive(Clone, Debug)]
pub struct IdentityMapPlan {
    ranges: [Range; MAX_RANGES],
    len: usize,
}

impl IdentityMapPlan {
    pub fn new(ranges: impl IntoIterator<Item = Range>) -> Result<Self, PlanError> {
        const EMPTY: Range = Range {
            start: 0,
            end: 0,
            access: Access::Data,
        };
        let mut plan = Self {
            ranges: [EMPTY; MAX_RANGES],
            len: 0,
        };
        for range in ranges {
            if range.start % SMALL_PAGE != 0 || range.end % SMALL_PAGE != 0 {
                return Err(PlanError::Misaligned(range));
            }
            let range = Range {
                start: range.start.max(SMALL_PAGE),
                ..range
            };
            if range.start < range.end {
                plan.insert_sorted(range)?;
            }
        }
        plan.merge()?;
        Ok(plan)
    }

    fn insert_sorted(&mut self, range: Range) -> Result<(), PlanError> {
        if self.len == MAX_RANGES {
            return Err(PlanError::TooManyRanges);
        }
        let at = self.ranges[..self.len].partition_point(|existing| existing.start < range.start);
        self.ranges.copy_within(at..self.len, at + 1);
        self.ranges[at] = range;
        self.len += 1;
        Ok(())
    }

    /// Refuses overlaps and joins neighbours that touch and share their access.
    fn merge(&mut self) -> Result<(), PlanError> {
        let mut merged = 0;
        for index in 0..self.len {
            let next = self.ranges[index];
            if merged > 0 {
                let last = &mut self.ranges[merged - 1];
                if next.start < last.end {
                    return Err(PlanError::Overlap(*last, next));
                }
                if next.start == last.end && next.access == last.access {
                    last.end = next.end;
                    continue;
                }
            }
            self.ranges[merged] = next;
            merged += 1;
        }
        self.len = merged;
        Ok(())
    }

    pub fn ranges(&self) -> &[Range] {
        &self.ranges[..self.len]
    }

    /// The pages to map, in ascending address order.
    pub fn pages(&self) -> impl Iterator<Item = PageMapping> + '_ {
        self.ranges().iter().flat_map(|range| pages_of(*range))
    }
}

/// Splits one range into the largest pages its alignment allows.
fn pages_of(range: Range) -> impl Iterator<Item = PageMapping> {
    let mut cursor = range.start;
    core::iter::from_fn(move || {
        if cursor >= range.end {
            return None;
        }
        let size = if cursor % LARGE_PAGE == 0 && range.end - cursor >= LARGE_PAGE {
            PageSize::Large
        } else {
            PageSize::Small
        };
        let page = PageMapping {
            start: cursor,
            size,
            access: range.access,
        };
        cursor += size.bytes();
        Some(page)
    })
}

/// The 4 KiB pages that hold the bytes `address..address + len`: a probe of a few bytes may
/// straddle a page boundary.
pub fn small_pages_covering(address: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = address / SMALL_PAGE * SMALL_PAGE;
    let end = address.saturating_add(len.max(1));
    core::iter::successors(Some(first), |page| page.checked_add(SMALL_PAGE))
        .take_while(move |page| *page < end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn data(start: u64, end: u64) -> Range {
        Range {
            start,
            end,
            access: Access::Data,
        }
    }

    fn code(start: u64, end: u64) -> Range {
        Range {
            start,
            end,
            access: Access::Code,
        }
    }

    fn sizes(plan: &IdentityMapPlan) -> (usize, usize) {
        let large = plan
            .pages()
            .filter(|page| page.size == PageSize::Large)
            .count();
        (plan.pages().count() - large, large)
    }

    #[test]
    fn aligned_memory_uses_large_pages_and_ragged_edges_small_ones() {
        let plan = IdentityMapPlan::new([data(6 * MIB - 8192, 10 * MIB + 4096)]).unwrap();
        let pages: Vec<_> = plan.pages().collect();
        assert_eq!(pages.len(), 2 + 2 + 1);
        assert_eq!(
            pages[0],
            PageMapping {
                start: 6 * MIB - 8192,
                size: PageSize::Small,
                access: Access::Data
            }
        );
        assert_eq!(
            pages[2],
            PageMapping {
                start: 6 * MIB,
                size: PageSize::Large,
                access: Access::Data
            }
        );
        assert_eq!(pages[3].start, 8 * MIB);
        assert_eq!(
            pages[4],
            PageMapping {
                start: 10 * MIB,
                size: PageSize::Small,
                access: Access::Data
            }
        );
    }

    #[test]
    fn pages_cover_exactly_the_ranges() {
        let ranges = [
            code(2 * MIB, 3 * MIB),
            data(3 * MIB, 64 * MIB),
            data(0x8000_0000, 0x8000_0000 + 12 * 4096),
        ];
        let plan = IdentityMapPlan::new(ranges).unwrap();
        let mut expected_next = None;
        let mut covered = 0;
        for page in plan.pages() {
            assert_eq!(page.start % page.size.bytes(), 0, "{page:?} misaligned");
            let inside = ranges
                .iter()
                .find(|range| {
                    range.start <= page.start && page.start + page.size.bytes() <= range.end
                })
                .expect("page outside every range");
            assert_eq!(inside.access, page.access);
            if let Some(next) = expected_next {
                assert!(page.start >= next, "pages out of order or overlapping");
            }
            expected_next = Some(page.start + page.size.bytes());
            covered += page.size.bytes();
        }
        assert_eq!(
            covered,
            ranges
                .iter()
                .map(|range| range.end - range.start)
                .sum::<u64>()
        );
    }

    #[test]
    fn neighbouring_regions_with_one_access_share_large_pages() {
        // Two data regions meeting at 5 MiB: the 4..6 MiB large page spans both.
        let plan = IdentityMapPlan::new([data(5 * MIB, 8 * MIB), data(4 * MIB, 5 * MIB)]).unwrap();
        assert_eq!(plan.ranges(), &[data(4 * MIB, 8 * MIB)]);
        assert_eq!(sizes(&plan), (0, 2));
    }

    #[test]
    fn different_access_is_never_merged() {
        let plan = IdentityMapPlan::new([code(4 * MIB, 5 * MIB), data(5 * MIB, 6 * MIB)]).unwrap();
        assert_eq!(plan.ranges().len(), 2);
        assert_eq!(sizes(&plan), (512, 0));
    }

    #[test]
    fn page_zero_stays_unmapped() {
        let plan = IdentityMapPlan::new([data(0, 4 * MIB)]).unwrap();
        assert_eq!(plan.pages().next().unwrap().start, SMALL_PAGE);
        // 0..2 MiB minus the first page in small pages, then one large page.
        assert_eq!(sizes(&plan), (511, 1));
        assert!(IdentityMapPlan::new([data(0, 4096)])
            .unwrap()
            .ranges()
            .is_empty());
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(
            IdentityMapPlan::new([data(4096, 8192 + 1)]).unwrap_err(),
            PlanError::Misaligned(data(4096, 8193))
        );
        assert_eq!(
            IdentityMapPlan::new([data(4 * MIB, 6 * MIB), code(5 * MIB, 7 * MIB)]).unwrap_err(),
            PlanError::Overlap(data(4 * MIB, 6 * MIB), code(5 * MIB, 7 * MIB))
        );
        let many =
            (1..=MAX_RANGES as u64 + 1).map(|index| data(index * 2 * MIB, index * 2 * MIB + 4096));
        assert_eq!(
            IdentityMapPlan::new(many).unwrap_err(),
            PlanError::TooManyRanges
        );
    }

    #[test]
    fn probe_pages_include_a_straddled_neighbour() {
        assert_eq!(
            small_pages_covering(0x1000, 8).collect::<Vec<_>>(),
            vec![0x1000]
        );
        assert_eq!(
            small_pages_covering(0x1ffc, 8).collect::<Vec<_>>(),
            vec![0x1000, 0x2000]
        );
        assert_eq!(
            small_pages_covering(0x1fff, 1).collect::<Vec<_>>(),
            vec![0x1000]
        );
        assert_eq!(small_pages_covering(u64::MAX - 3, 8).count(), 1);
    }
}
