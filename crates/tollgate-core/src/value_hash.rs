//! The counter-key hash of a scope of one short value, computed in registers.
//!
//! A scope's counter key is the XXH3-128 (seeded) of each value's length as
//! `u32` LE followed by the value. For the usual scope, one short id, the
//! engine used to lay those bytes out in a stack buffer (a 4-byte store,
//! then the value's bytes in 8-byte stores at offset 4) and hash the
//! buffer, whose first 8-byte load spans two of those stores: the CPU
//! cannot forward it from its store buffer and waits until both stores
//! reach the cache, a stall on every decision (`BENCHMARKS.md` core15:
//! about a third of an in-process decision's time).
//!
//! [`value_hash`] gives the same 128 bits, [`xxh3_128_with_seed`] of those
//! bytes, for values of 1 to [`MAX_LEN`] bytes, without the buffer: each
//! 8-byte word XXH3 reads is built from reads of the value itself and the
//! length, and the short-input paths of XXH3 (4 to 8, 9 to 16 and 17 to 32
//! bytes of input, as in `xxhash-rust`, which follows the reference
//! implementation) run on those words. A test compares it with
//! `xxhash-rust` for every length and many values and seeds.
//!
//! [`xxh3_128_with_seed`]: xxhash_rust::xxh3::xxh3_128_with_seed

/// Longest value [`value_hash`] takes (4 + 28 = 32 bytes of input).
pub(crate) const MAX_LEN: usize = 28;

// XXH3's numbers (`xxhash-rust`'s `xxh64::PRIME_*`, `xxh32::PRIME_2`).
const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME32_2: u32 = 0x85EB_CA77;

/// The words of XXH3's default secret that inputs of 4 to 32 bytes use
/// (its bytes 0 to 63, as little-endian `u64`s).
const SECRET: [u64; 8] = [
    0xbe4b_a423_396c_feb8,
    0x1cad_21f7_2c81_017c,
    0xdb97_9083_e96d_d4de,
    0x1f67_b3b7_a4a4_4072,
    0x78e5_c0cc_4ee6_79cb,
    0x2172_ffcc_7dd0_5a82,
    0x8e24_43f7_7446_08b8,
    0x4c26_3a81_e690_35e0,
];

/// `xxh3_128_with_seed` of `len(value) as u32 LE ++ value`, for a value of
/// 1 to [`MAX_LEN`] bytes (`None` otherwise: the caller hashes it as
/// bytes).
#[inline(always)]
pub(crate) fn value_hash(value: &[u8], seed: u64) -> Option<u128> {
    let n = value.len();
    let len = n as u64 + 4;
    match n {
        // 5 to 16 bytes of input, all in a `u128`: the length, then the value.
        1..=12 => {
            let input = u128::from(n as u32) | (le_up_to_12(value) << 32);
            Some(if n <= 4 {
                let lo = input as u32;
                let hi = (input >> (8 * (len - 4))) as u32;
                hash_4to8(lo, hi, len, seed)
            } else {
                hash_9to16(input as u64, (input >> (8 * (len - 8))) as u64, len, seed)
            })
        }
        // 17 to 32 bytes of input: its words at 0, 8, len - 16 and len - 8.
        13..=MAX_LEN => {
            let w0 = u64::from(n as u32) | (u64::from(le32(value, 0)) << 32);
            let w1 = le64(value, 4);
            // At input offset `len - 16`, value offset `n - 16`: before the
            // value's start (inside the length) for values under 16 bytes.
            let w2 = match n.checked_sub(16) {
                Some(at) => le64(value, at),
                // The length's bytes past the first are zero (n < 256).
                None => le64(value, 0) << (8 * (16 - n)),
            };
            let w3 = le64(value, n - 8);
            Some(hash_17to32([w0, w1], [w2, w3], len, seed))
        }
        _ => None,
    }
}

/// The 8 bytes of `v` at `at`, little-endian (`at + 8 <= v.len()`).
#[inline(always)]
fn le64(v: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The 4 bytes of `v` at `at`, little-endian (`at + 4 <= v.len()`).
#[inline(always)]
fn le32(v: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&v[at..at + 4]);
    u32::from_le_bytes(b)
}

/// `v` (1 to 12 bytes) as a little-endian number: two reads that overlap
/// (the bytes they share are the same, so or-ing them is exact).
#[inline(always)]
fn le_up_to_12(v: &[u8]) -> u128 {
    let n = v.len();
    match n {
        8.. => u128::from(le64(v, 0)) | (u128::from(le64(v, n - 8)) << (8 * (n - 8))),
        4.. => u128::from(le32(v, 0)) | (u128::from(le32(v, n - 4)) << (8 * (n - 4))),
        1.. => {
            let (a, b, c) = (v[0], v[n / 2], v[n - 1]);
            u128::from(a) | (u128::from(b) << (8 * (n / 2))) | (u128::from(c) << (8 * (n - 1)))
        }
        0 => 0,
    }
}

#[inline(always)]
fn mul128(a: u64, b: u64) -> (u64, u64) {
    let p = u128::from(a) * u128::from(b);
    (p as u64, (p >> 64) as u64)
}

#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let (lo, hi) = mul128(a, b);
    lo ^ hi
}

#[inline(always)]
fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 37;
    h = h.wrapping_mul(0x1656_6791_9E37_79F9);
    h ^ (h >> 32)
}

/// XXH3-128 of 4 to 8 bytes whose first and last 4 are `lo` and `hi`.
#[inline(always)]
fn hash_4to8(lo: u32, hi: u32, len: u64, seed: u64) -> u128 {
    let seed = seed ^ (u64::from((seed as u32).swap_bytes()) << 32);
    let input = u64::from(lo).wrapping_add(u64::from(hi) << 32);
    let flip = (SECRET[2] ^ SECRET[3]).wrapping_add(seed);
    let (mut l, mut h) = mul128(input ^ flip, PRIME64_1.wrapping_add(len << 2));
    h = h.wrapping_add(l << 1);
    l ^= h >> 3;
    l ^= l >> 35;
    l = l.wrapping_mul(0x9FB2_1C65_1E98_DF25);
    l ^= l >> 28;
    u128::from(l) | (u128::from(avalanche(h)) << 64)
}

/// XXH3-128 of 9 to 16 bytes whose first and last 8 are `lo` and `hi`.
#[inline(always)]
fn hash_9to16(lo: u64, hi: u64, len: u64, seed: u64) -> u128 {
    let flip_lo = (SECRET[4] ^ SECRET[5]).wrapping_sub(seed);
    let flip_hi = (SECRET[6] ^ SECRET[7]).wrapping_add(seed);
    let (mut mul_lo, mut mul_hi) = mul128(lo ^ hi ^ flip_lo, PRIME64_1);
    mul_lo = mul_lo.wrapping_add((len - 1) << 54);
    let hi = hi ^ flip_hi;
    mul_hi = mul_hi.wrapping_add(hi.wrapping_add(u64::from(hi as u32) * u64::from(PRIME32_2 - 1)));
    mul_lo ^= mul_hi.swap_bytes();
    let (r_lo, r_hi) = mul128(mul_lo, PRIME64_2);
    let r_hi = r_hi.wrapping_add(mul_hi.wrapping_mul(PRIME64_2));
    u128::from(avalanche(r_lo)) | (u128::from(avalanche(r_hi)) << 64)
}

/// XXH3-128 of 17 to 32 bytes whose first 16 are `a` and last 16 `b`.
#[inline(always)]
fn hash_17to32(a: [u64; 2], b: [u64; 2], len: u64, seed: u64) -> u128 {
    let mix16 = |w: [u64; 2], s0: u64, s1: u64| {
        fold(w[0] ^ s0.wrapping_add(seed), w[1] ^ s1.wrapping_sub(seed))
    };
    let mut lo = len.wrapping_mul(PRIME64_1);
    let mut hi = 0u64;
    lo = lo.wrapping_add(mix16(a, SECRET[0], SECRET[1]));
    lo ^= b[0].wrapping_add(b[1]);
    hi = hi.wrapping_add(mix16(b, SECRET[2], SECRET[3]));
    hi ^= a[0].wrapping_add(a[1]);
    let h_lo = avalanche(lo.wrapping_add(hi));
    let h_hi = 0u64.wrapping_sub(avalanche(
        lo.wrapping_mul(PRIME64_1)
            .wrapping_add(hi.wrapping_mul(PRIME64_4))
            .wrapping_add(len.wrapping_sub(seed).wrapping_mul(PRIME64_2)),
    ));
    u128::from(h_lo) | (u128::from(h_hi) << 64)
}

#[cfg(test)]
mod tests {
    use xxhash_rust::xxh3::xxh3_128_with_seed;

    use super::*;

    /// The bytes the engine hashed before: the length as `u32` LE, then the value.
    fn reference(value: &[u8], seed: u64) -> u128 {
        let mut input = (value.len() as u32).to_le_bytes().to_vec();
        input.extend_from_slice(value);
        xxh3_128_with_seed(&input, seed)
    }

    #[test]
    fn the_secret_is_xxh3s_default() {
        // The first 64 bytes of XXH3's default secret (the reference's `kSecret`).
        let bytes: [u8; 64] = [
            0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21,
            0xad, 0x1c, 0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4,
            0xb7, 0xb3, 0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a,
            0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21, 0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e,
            0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
        ];
        for (k, w) in SECRET.iter().enumerate() {
            assert_eq!(*w, le64(&bytes, 8 * k), "word {k}");
        }
    }

    /// Every length from 0 to past [`MAX_LEN`], with values of all-zero,
    /// all-one and pseudo-random bytes, under seeds at the edges and
    /// random ones: the same 128 bits as `xxhash-rust`, or `None`.
    #[test]
    fn matches_xxh3_for_every_length() {
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut seeds = vec![0, 1, 7, u64::MAX, 1 << 63, u64::from(u32::MAX)];
        seeds.extend((0..26).map(|_| next()));
        let mut checked = 0;
        for n in 0..=MAX_LEN + 4 {
            for &seed in &seeds {
                let mut values = vec![vec![0u8; n], vec![0xFF; n]];
                values.extend((0..64).map(|_| (0..n).map(|_| next() as u8).collect()));
                for v in &values {
                    match value_hash(v, seed) {
                        Some(h) => {
                            assert_eq!(h, reference(v, seed), "n {n}, seed {seed:#x}, {v:x?}");
                            checked += 1;
                        }
                        None => assert!(n == 0 || n > MAX_LEN, "n {n} not hashed"),
                    }
                }
            }
        }
        assert_eq!(checked, MAX_LEN * 32 * 66);
    }
}
