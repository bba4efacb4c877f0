//! Permissions a parent takes on a child and shares with other parents, as QEMU defines them
//! (graph-mod is gone since QEMU 7.0; frozen edges replace it).
//!
//! The bit numbers matter outside the process: the file driver's image locks put permission
//! `i` at byte 100 + i (held) and 200 + i (not shared), so QEMU and strata see each other.

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign, Not};

/// A set of permissions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    /// Reads return what the image holds (no one else changes it meanwhile).
    pub const CONSISTENT_READ: Perm = Perm(1 << 0);
    /// Writes that change the content.
    pub const WRITE: Perm = Perm(1 << 1);
    /// Writes that leave the content as it was (copy-on-read, stream's copies).
    pub const WRITE_UNCHANGED: Perm = Perm(1 << 2);
    /// Changing the length.
    pub const RESIZE: Perm = Perm(1 << 3);
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// Every permission.
    pub const ALL: Perm = Perm(0b1111);

    /// The permissions one at a time, with their bit index and QEMU's name.
    pub const EACH: [(usize, Perm, &'static str); 4] = [
        (0, Perm::CONSISTENT_READ, "consistent read"),
        (1, Perm::WRITE, "write"),
        (2, Perm::WRITE_UNCHANGED, "write unchanged"),
        (3, Perm::RESIZE, "resize"),
    ];

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// From raw bits (unknown bits dropped).
    pub const fn from_bits(bits: u8) -> Perm {
        Perm(bits & Perm::ALL.0)
    }

    /// Whether every permission of `other` is in `self`.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` and `other` have a permission in common.
    pub const fn intersects(self, other: Perm) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no permission is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// QEMU's name of the permissions, comma-separated ("write, resize").
    pub fn names(self) -> String {
        let v: Vec<&str> = Perm::EACH
            .iter()
            .filter(|(_, p, _)| self.contains(*p))
            .map(|(_, _, n)| *n)
            .collect();
        v.join(", ")
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, o: Perm) -> Perm {
        Perm(self.0 | o.0)
    }
}

impl BitOrAssign for Perm {
    fn bitor_assign(&mut self, o: Perm) {
        self.0 |= o.0;
    }
}

impl BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, o: Perm) -> Perm {
        Perm(self.0 & o.0)
    }
}

impl Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm({})", self.names())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ops() {
        let p = Perm::WRITE | Perm::RESIZE;
        assert_eq!(p.names(), "write, resize");
        assert!(p.contains(Perm::WRITE));
        assert!(!p.contains(Perm::CONSISTENT_READ));
        assert_eq!(!p, Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED);
        assert_eq!(Perm::from_bits(0xff), Perm::ALL);
    }
}
