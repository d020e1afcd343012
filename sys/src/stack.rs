//! The stack a vfork-style child runs on between its clone and `execve`.
#![allow(unsafe_code)]

use nix::errno::Errno;
use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, mprotect, munmap};
use std::num::NonZeroUsize;
use std::ptr::NonNull;

/// Usable size: the child runs a handful of syscall wrappers, no more.
/// Pages are only committed when touched, so the size costs nothing.
pub const CHILD_STACK: usize = 256 * 1024;
/// One page below the stack that faults on touch.
const GUARD: usize = 4096;

/// Fresh anonymous pages (only the few the child touches count towards the
/// parent's memory) above a guard page, so that an overflow faults instead
/// of writing over the parent's heap, which the child shares.
#[derive(Debug)]
pub struct ChildStack {
    base: NonNull<libc::c_void>,
    len: usize,
}

impl ChildStack {
    /// Maps [`CHILD_STACK`] bytes above a guard page.
    pub fn new() -> Result<ChildStack, Errno> {
        let len = CHILD_STACK + GUARD;
        let size = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_STACK,
            )?
        };
        // Owned from here, so an error below unmaps it.
        let stack = ChildStack { base, len };
        // SAFETY: the lowest page of the mapping made above (stacks grow
        // down), which no slice handed out ever covers.
        unsafe { mprotect(base, GUARD, ProtFlags::PROT_NONE)? };
        Ok(stack)
    }

    /// The usable part, above the guard page.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable past the
        // guard page, owned by `self` and alive as long as the borrow.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.as_ptr().cast::<u8>().add(GUARD),
                self.len - GUARD,
            )
        }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which no borrow
        // outlives (a child that ran on it has exec'd or exited by the time
        // its spawn returns).
        let _ = unsafe { munmap(self.base, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usable_part_is_writable_and_sized() {
        let mut stack = ChildStack::new().expect("mmap");
        let slice = stack.as_mut_slice();
        assert_eq!(slice.len(), CHILD_STACK);
        slice[0] = 1;
        slice[CHILD_STACK - 1] = 2;
        assert_eq!((slice[0], slice[CHILD_STACK - 1]), (1, 2));
    }

    #[test]
    fn a_guard_page_lies_below_the_stack() {
        let mut stack = ChildStack::new().expect("mmap");
        let low = stack.as_mut_slice().as_ptr() as usize;
        let guard = format!("{:x}-{:x} ---p", low - GUARD, low);
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        assert!(
            maps.lines().any(|l| l.starts_with(&guard)),
            "no {guard} in\n{maps}"
        );
    }
}
