//! A fixed-size FIFO of bytes for the asynchronous console (`console`): a line goes in
//! whole or not at all, and bytes come out in the order they went in. No locking here;
//! the console keeps the queue under a lock.

pub struct LineQueue<const N: usize> {
    bytes: [u8; N],
    /// Index of the oldest byte.
    head: usize,
    len: usize,
}

impl<const N: usize> LineQueue<N> {
    pub const fn new() -> Self {
        Self {
            bytes: [0; N],
            head: 0,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes that can still be appended.
    pub fn room(&self) -> usize {
        N - self.len
    }

    /// Appends the concatenation of `parts` if all of it fits, else nothing. Returns
    /// whether it was appended.
    pub fn push(&mut self, parts: &[&[u8]]) -> bool {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > N - self.len {
            return false;
        }
        for part in parts {
            let tail = (self.head + self.len) % N;
            // Up to the end of the array, then the rest from its start.
            let first = part.len().min(N - tail);
            self.bytes[tail..tail + first].copy_from_slice(&part[..first]);
            self.bytes[..part.len() - first].copy_from_slice(&part[first..]);
            self.len += part.len();
        }
        true
    }

    /// Moves the oldest bytes into `out`, as many as it holds; returns how many.
    pub fn pop_into(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.len);
        let first = n.min(N - self.head);
        out[..first].copy_from_slice(&self.bytes[self.head..self.head + first]);
        out[first..n].copy_from_slice(&self.bytes[..n - first]);
        self.head = (self.head + n) % N;
        self.len -= n;
        n
    }

    /// Offers the oldest byte to `take` and removes it if `take` accepts it. Returns
    /// whether a byte was taken (false when the queue is empty).
    pub fn pop_if(&mut self, take: impl FnOnce(u8) -> bool) -> bool {
        if self.len == 0 || !take(self.bytes[self.head]) {
            return false;
        }
        self.head = (self.head + 1) % N;
        self.len -= 1;
        true
    }
}

impl<const N: usize> Default for LineQueue<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn pop_all<const N: usize>(q: &mut LineQueue<N>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 3];
        loop {
            let n = q.pop_into(&mut chunk);
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    }

    #[test]
    fn lines_go_in_whole_or_not_at_all() {
        let mut q = LineQueue::<8>::new();
        assert_eq!(q.room(), 8);
        assert!(q.push(&[b"[a] ", b"xy\n"]));
        assert_eq!((q.len(), q.room()), (7, 1));
        // Two bytes would fit partly: nothing goes in.
        assert!(!q.push(&[b"z", b"\n"]));
        assert_eq!(q.len(), 7);
        assert!(q.push(&[b"\n"]));
        assert!(!q.push(&[b"\n"]));
        assert_eq!(pop_all(&mut q), b"[a] xy\n\n");
        assert!(q.is_empty());
    }

    #[test]
    fn order_is_kept_across_the_wrap() {
        let mut q = LineQueue::<8>::new();
        let mut expected = Vec::new();
        let mut seen = Vec::new();
        for i in 0..20u8 {
            let line = [b'a' + i, b'a' + i, b'\n'];
            if !q.push(&[&line[..1], &line[1..]]) {
                seen.extend(pop_all(&mut q));
                assert!(q.push(&[&line]));
            }
            expected.extend_from_slice(&line);
            // Leave some bytes behind so the head moves around the array.
            let mut one = [0u8; 1];
            if i % 3 == 0 && q.pop_into(&mut one) == 1 {
                seen.push(one[0]);
            }
        }
        seen.extend(pop_all(&mut q));
        assert_eq!(seen, expected);
    }

    #[test]
    fn pop_if_takes_a_byte_only_when_accepted() {
        let mut q = LineQueue::<4>::new();
        assert!(!q.pop_if(|_| true));
        assert!(q.push(&[b"ab"]));
        assert!(!q.pop_if(|_| false));
        assert_eq!(q.len(), 2);
        let mut got = None;
        assert!(q.pop_if(|b| {
            got = Some(b);
            true
        }));
        assert_eq!(got, Some(b'a'));
        assert_eq!(pop_all(&mut q), b"b");
    }
}
