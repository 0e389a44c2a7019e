//! Little-endian cursors that encoders and decoders are written with: every read and write is
//! bounds-checked and reports a typed error instead of panicking.

use crate::message::{DecodeError, EncodeError};

pub(crate) struct Writer<'a> {
    out: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    #[inline]
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        Self { out, len: 0 }
    }

    #[inline]
    fn put(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let available = self.out.len();
        let end = self.len + bytes.len();
        let destination = self
            .out
            .get_mut(self.len..end)
            .ok_or(EncodeError::BufferTooSmall {
                needed: end,
                available,
            })?;
        destination.copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    #[inline]
    pub(crate) fn u8(&mut self, value: u8) -> Result<(), EncodeError> {
        self.put(&[value])
    }

    #[inline]
    pub(crate) fn u16(&mut self, value: u16) -> Result<(), EncodeError> {
        self.put(&value.to_le_bytes())
    }

    #[inline]
    pub(crate) fn u32(&mut self, value: u32) -> Result<(), EncodeError> {
        self.put(&value.to_le_bytes())
    }

    #[inline]
    pub(crate) fn u64(&mut self, value: u64) -> Result<(), EncodeError> {
        self.put(&value.to_le_bytes())
    }

    #[inline]
    pub(crate) fn i64(&mut self, value: i64) -> Result<(), EncodeError> {
        self.put(&value.to_le_bytes())
    }

    /// Bytes written so far: the encoded message length once done.
    #[inline]
    pub(crate) fn finish(self) -> usize {
        self.len
    }
}

pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    #[inline]
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.position + N;
        let field = self
            .bytes
            .get(self.position..end)
            .ok_or(DecodeError::Truncated {
                needed: end,
                available: self.bytes.len(),
            })?;
        let mut out = [0u8; N];
        out.copy_from_slice(field);
        self.position = end;
        Ok(out)
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    #[inline]
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.take().map(u16::from_le_bytes)
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.take().map(u32::from_le_bytes)
    }

    #[inline]
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        self.take().map(u64::from_le_bytes)
    }

    #[inline]
    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        self.take().map(i64::from_le_bytes)
    }

    /// Reads a reserved field of `N` bytes, which must be zero.
    #[inline]
    pub(crate) fn reserved<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<(), DecodeError> {
        if self.take::<N>()? == [0; N] {
            Ok(())
        } else {
            Err(DecodeError::ReservedBitsSet { field })
        }
    }

    /// Succeeds only if every byte after the message is zero: a message is its encoding,
    /// optionally zero-padded (as in a record slot, which the message fills only in part).
    #[inline]
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        let rest = self.bytes.get(self.position..).unwrap_or_default();
        // Word by word: on targets without SIMD (the bare-metal ones) a byte loop over a
        // record's padding cost a guest more than the rest of decoding an event.
        let mut words = rest.chunks_exact(8);
        let padding_is_zero = words.all(|word| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            u64::from_ne_bytes(bytes) == 0
        }) && words.remainder().iter().all(|&byte| byte == 0);
        if padding_is_zero {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { extra: rest.len() })
        }
    }
}
