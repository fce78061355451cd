//! Boxes of a global tensor: an offset and a size in every dimension. A
//! rank saves a box of each tensor it holds (a whole tensor is the box at
//! the origin with the global shape; a row split is a box whose offset is
//! zero past the first dimension; a column split of a tensor-parallel layer
//! is a box in dimension 1), and a load asks for any box: these plain
//! functions find what a stored box gives of a wanted one, copy it, and
//! keep track of what is still missing.

/// A box of a tensor of some global shape: `offset[d] .. offset[d] + shape[d]`
/// in every dimension `d`. A scalar's box has no dimensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub offset: Vec<usize>,
    pub shape: Vec<usize>,
}

impl Region {
    /// All of a tensor of shape `global`.
    pub fn whole(global: &[usize]) -> Region {
        Region { offset: vec![0; global.len()], shape: global.to_vec() }
    }

    /// Its number of elements (saturating: a hostile shape cannot overflow).
    pub fn volume(&self) -> u128 {
        self.shape.iter().fold(1u128, |n, &d| n.saturating_mul(d as u128))
    }

    /// Whether it holds no element (a zero in its shape).
    pub fn is_empty(&self) -> bool {
        self.shape.contains(&0)
    }

    /// Whether it lies inside a tensor of shape `global` (same number of
    /// dimensions, every end within bounds).
    pub fn fits(&self, global: &[usize]) -> bool {
        self.offset.len() == global.len()
            && self.shape.len() == global.len()
            && self.offset.iter().zip(&self.shape).zip(global).all(|((&o, &s), &g)| o.checked_add(s).is_some_and(|end| end <= g))
    }

    /// The box both hold, if any (`None` when they do not overlap or have
    /// different ranks).
    pub fn intersect(&self, other: &Region) -> Option<Region> {
        let rank = self.offset.len();
        if [self.shape.len(), other.offset.len(), other.shape.len()].iter().any(|&n| n != rank) {
            return None;
        }
        let mut offset = Vec::with_capacity(rank);
        let mut shape = Vec::with_capacity(rank);
        for d in 0..rank {
            let lo = self.offset[d].max(other.offset[d]);
            let hi = self.offset[d].saturating_add(self.shape[d]).min(other.offset[d].saturating_add(other.shape[d]));
            if lo >= hi {
                return None;
            }
            offset.push(lo);
            shape.push(hi - lo);
        }
        Some(Region { offset, shape })
    }

    /// What is left of this box once `cut` is taken out: disjoint boxes,
    /// at most two per dimension.
    pub fn minus(&self, cut: &Region) -> Vec<Region> {
        let Some(inner) = self.intersect(cut) else { return vec![self.clone()] };
        let mut left = Vec::new();
        // Peel slabs off dimension by dimension: below and above `inner`
        // in dimension d, with the dimensions before d already narrowed.
        let mut rest = self.clone();
        for d in 0..self.offset.len() {
            let (lo, hi) = (inner.offset[d], inner.offset[d] + inner.shape[d]);
            let (start, end) = (rest.offset[d], rest.offset[d] + rest.shape[d]);
            if start < lo {
                let mut below = rest.clone();
                below.shape[d] = lo - start;
                left.push(below);
            }
            if hi < end {
                let mut above = rest.clone();
                above.offset[d] = hi;
                above.shape[d] = end - hi;
                left.push(above);
            }
            rest.offset[d] = lo;
            rest.shape[d] = hi - lo;
        }
        left
    }
}

/// Take `cut` out of every box of `missing`.
pub fn subtract(missing: &[Region], cut: &Region) -> Vec<Region> {
    missing.iter().flat_map(|m| m.minus(cut)).collect()
}

/// The most boxes a check of coverage keeps track of: pieces cut so finely
/// that more are left (hostile records, or a layout no trainer makes) are
/// refused rather than tracked without bound.
pub const MAX_LEFT: usize = 1 << 16;

/// Copy what `from` (a stored box, its bytes `src` row-major) holds of
/// `into` (a wanted box, its bytes `dst`), elements of `size` bytes.
/// Returns false when a buffer is shorter than its box.
pub fn copy_overlap(size: usize, from: &Region, src: &[u8], into: &Region, dst: &mut [u8]) -> bool {
    let bytes = |r: &Region| usize::try_from(r.volume()).ok().and_then(|v| v.checked_mul(size));
    if bytes(from).is_none_or(|n| src.len() < n) || bytes(into).is_none_or(|n| dst.len() < n) {
        return false;
    }
    let Some(both) = from.intersect(into) else { return true };
    let rank = both.offset.len();
    if rank == 0 {
        dst[..size].copy_from_slice(&src[..size]);
        return true;
    }
    // Row-major strides (in elements) of each box.
    let strides = |shape: &[usize]| {
        let mut s = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            s[d] = s[d + 1] * shape[d + 1];
        }
        s
    };
    let (src_strides, dst_strides) = (strides(&from.shape), strides(&into.shape));
    let run = both.shape[rank - 1] * size;
    // Walk every index of the overlap but the last dimension; each is one
    // contiguous run in both boxes.
    let mut index = vec![0usize; rank - 1];
    loop {
        let (mut s, mut t) = (0usize, 0usize);
        for d in 0..rank {
            let at = both.offset[d] + index.get(d).copied().unwrap_or(0);
            s += (at - from.offset[d]) * src_strides[d];
            t += (at - into.offset[d]) * dst_strides[d];
        }
        dst[t * size..t * size + run].copy_from_slice(&src[s * size..s * size + run]);
        // Next index, last-but-one dimension fastest.
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return true;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < both.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: &[usize], shape: &[usize]) -> Region {
        Region { offset: offset.to_vec(), shape: shape.to_vec() }
    }

    /// A tensor whose element at row-major index i is i, as u16 bytes.
    fn numbered(shape: &[usize]) -> Vec<u8> {
        let n: usize = shape.iter().product();
        (0..n as u16).flat_map(u16::to_le_bytes).collect()
    }

    /// The bytes of box `b` of a `numbered(global)` tensor, cut out element by element.
    fn cut(global: &[usize], b: &Region) -> Vec<u8> {
        let all = numbered(global);
        let mut out = Vec::new();
        let n: usize = b.shape.iter().product();
        for i in 0..n {
            // The i-th element of the box, row-major, as a global index.
            let (mut rest, mut flat) = (i, 0usize);
            let mut stride = 1;
            for d in (0..global.len()).rev() {
                let k = rest % b.shape[d];
                rest /= b.shape[d];
                flat += (b.offset[d] + k) * stride;
                stride *= global[d];
            }
            out.extend_from_slice(&all[flat * 2..flat * 2 + 2]);
        }
        out
    }

    #[test]
    fn overlaps_are_found_in_every_dimension() {
        assert_eq!(r(&[0, 0], &[4, 6]).intersect(&r(&[2, 3], &[5, 5])), Some(r(&[2, 3], &[2, 3])));
        assert_eq!(r(&[0, 0], &[4, 3]).intersect(&r(&[0, 3], &[4, 3])), None, "touching is not overlapping");
        assert_eq!(r(&[], &[]).intersect(&r(&[], &[])), Some(r(&[], &[])), "a scalar holds itself");
        assert_eq!(r(&[0], &[2]).intersect(&r(&[0, 0], &[2, 2])), None);
        assert!(r(&[2, 3], &[2, 3]).fits(&[4, 6]) && !r(&[2, 4], &[2, 3]).fits(&[4, 6]) && !r(&[0], &[4]).fits(&[4, 6]));
        assert!(!r(&[usize::MAX], &[2]).fits(&[4]), "an end past usize does not wrap");
    }

    #[test]
    fn what_is_left_after_a_cut_is_disjoint_and_complete() {
        let whole = r(&[0, 0, 0], &[4, 5, 6]);
        for cut in [r(&[1, 1, 1], &[2, 3, 4]), r(&[0, 0, 0], &[4, 5, 3]), r(&[3, 0, 5], &[9, 9, 9]), r(&[0, 0, 0], &[4, 5, 6])] {
            let left = whole.minus(&cut);
            let taken = whole.intersect(&cut).map_or(0, |i| i.volume());
            assert_eq!(left.iter().map(Region::volume).sum::<u128>() + taken, whole.volume(), "{cut:?}");
            for (i, a) in left.iter().enumerate() {
                assert!(a.fits(&[4, 5, 6]) && a.intersect(&cut).is_none(), "{a:?}");
                assert!(left[i + 1..].iter().all(|b| a.intersect(b).is_none()), "overlapping leftovers {left:?}");
            }
        }
        assert_eq!(whole.minus(&r(&[9, 9, 9], &[1, 1, 1])), vec![whole.clone()]);
        // Three column blocks cover a matrix; two of them do not.
        let m = vec![r(&[0, 0], &[4, 6])];
        let cols = [r(&[0, 0], &[4, 2]), r(&[0, 2], &[4, 2]), r(&[0, 4], &[4, 2])];
        let after_two = subtract(&subtract(&m, &cols[0]), &cols[1]);
        assert_eq!(after_two, vec![r(&[0, 4], &[4, 2])]);
        assert!(subtract(&after_two, &cols[2]).is_empty());
    }

    #[test]
    fn any_wanted_box_is_reassembled_from_any_stored_boxes() {
        let global = [6usize, 5, 4];
        // Stored: split by rows on one side and by columns on the other
        // (what two tensor-parallel layouts save), plus a replicated copy.
        let stored = [
            r(&[0, 0, 0], &[3, 5, 4]),
            r(&[3, 0, 0], &[3, 2, 4]),
            r(&[3, 2, 0], &[3, 3, 1]),
            r(&[3, 2, 1], &[3, 3, 3]),
            r(&[0, 0, 0], &[6, 5, 4]),
        ];
        for want in [r(&[0, 0, 0], &[6, 5, 4]), r(&[1, 1, 1], &[4, 3, 2]), r(&[3, 2, 0], &[3, 3, 4]), r(&[5, 4, 3], &[1, 1, 1])] {
            for pieces in [&stored[..4], &stored[4..]] {
                let mut out = vec![0u8; want.volume() as usize * 2];
                let mut missing = vec![want.clone()];
                for p in pieces {
                    if missing.iter().any(|m| m.intersect(p).is_some()) {
                        assert!(copy_overlap(2, p, &cut(&global, p), &want, &mut out));
                        missing = subtract(&missing, p);
                    }
                }
                assert!(missing.is_empty(), "{want:?} from {pieces:?}: {missing:?}");
                assert_eq!(out, cut(&global, &want), "{want:?} from {pieces:?}");
            }
        }
    }

    #[test]
    fn empty_and_huge_boxes() {
        assert!(r(&[0, 0], &[0, 4]).is_empty() && !r(&[], &[]).is_empty());
        assert_eq!(r(&[0, 0], &[0, 4]).intersect(&r(&[0, 0], &[4, 4])), None, "an empty box overlaps nothing");
        let huge = r(&[0; 8], &[usize::MAX; 8]);
        assert_eq!(huge.volume(), u128::MAX, "saturates");
        assert_eq!(huge.intersect(&r(&[usize::MAX - 1; 8], &[9; 8])).map(|b| b.shape), Some(vec![usize::MAX - (usize::MAX - 1); 8]));
    }

    #[test]
    fn scalars_and_short_buffers() {
        let mut out = [0u8; 4];
        assert!(copy_overlap(4, &r(&[], &[]), &[1, 2, 3, 4], &r(&[], &[]), &mut out));
        assert_eq!(out, [1, 2, 3, 4]);
        let mut out = [0u8; 8];
        assert!(!copy_overlap(2, &r(&[0], &[4]), &[0; 6], &r(&[0], &[4]), &mut out), "a source shorter than its box");
        assert!(!copy_overlap(2, &r(&[0], &[4]), &[0; 8], &r(&[0], &[5]), &mut out), "a destination shorter than its box");
        assert!(copy_overlap(2, &r(&[0], &[2]), &[0; 4], &r(&[2], &[2]), &mut out[..4]), "nothing in common: nothing copied");
    }
}
