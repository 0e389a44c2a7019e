//! Locks that are safe to share with interrupt handlers.
//!
//! A plain spin lock taken by a thread with interrupts on deadlocks if an interrupt handler on
//! the same core then takes it: the handler spins on a lock its own core holds. `IrqMutex`
//! masks interrupts for as long as it is held (and restores the previous state), so every lock
//! the scheduler, the control channel or the console share with handlers is one of these. With
//! interrupts off a holder is never preempted either, so no core ever waits on a holder that is
//! not running.

use core::ops::{Deref, DerefMut};

use spin::{Mutex, MutexGuard};
use x86_64::instructions::interrupts;

pub struct IrqMutex<T>(Mutex<T>);

pub struct IrqGuard<'a, T> {
    /// `None` only while being dropped.
    guard: Option<MutexGuard<'a, T>>,
    interrupts_were_on: bool,
}

impl<T> IrqMutex<T> {
    pub const fn new(value: T) -> Self {
        Self(Mutex::new(value))
    }

    /// Takes the lock. A caller with interrupts on keeps taking interrupts while it waits
    /// (the holder may be another core inside a slow hypercall); they are masked only once the
    /// lock is held.
    pub fn lock(&self) -> IrqGuard<'_, T> {
        loop {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            while self.0.is_locked() {
                core::hint::spin_loop();
            }
        }
    }

    /// Whether some core holds the lock right now (a hint: it may change at once).
    pub fn is_locked(&self) -> bool {
        self.0.is_locked()
    }

    /// The lock if it is free right now (for work any core may do, such as polling a ring).
    pub fn try_lock(&self) -> Option<IrqGuard<'_, T>> {
        let interrupts_were_on = interrupts::are_enabled();
        interrupts::disable();
        match self.0.try_lock() {
            Some(guard) => Some(IrqGuard {
                guard: Some(guard),
                interrupts_were_on,
            }),
            None => {
                if interrupts_were_on {
                    interrupts::enable();
                }
                None
            }
        }
    }
}

impl<T> Deref for IrqGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.guard.as_ref().expect("guard is live until dropped")
    }
}

impl<T> DerefMut for IrqGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard.as_mut().expect("guard is live until dropped")
    }
}

impl<T> Drop for IrqGuard<'_, T> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if self.interrupts_were_on {
            interrupts::enable();
        }
    }
}
