//! Holding what a device copy needs until the device is done with it.

use std::any::Any;
use std::sync::OnceLock;
use std::sync::mpsc::{Sender, channel};

use parking_lot::Mutex;

use super::Fence;

type Held = (Fence, Box<dyn Any + Send>);

/// Keeps `keep` (slot handles, a hold on the connection) alive until `fence` completes, then
/// drops it, without blocking the caller. A copy's owner may wait for the fence itself or not at
/// all: either way nothing `keep` holds is let go while the device may still touch it, and no
/// thread of the engine has to come back for it (a connection ending on another thread waits
/// for these holds, so they must end on their own).
pub fn after(fence: Fence, keep: Box<dyn Any + Send>) {
    if fence.is_done() {
        return;
    }
    static REAPER: OnceLock<Option<Mutex<Sender<Held>>>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = channel::<Held>();
        std::thread::Builder::new()
            .name("kvtier-fences".into())
            .spawn(move || {
                for (fence, keep) in rx {
                    if let Err(e) = fence.wait() {
                        tracing::warn!(error = %e, "a device copy failed; its slots are let go");
                    }
                    drop(keep);
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    });
    match reaper {
        Some(tx) => {
            if let Err(back) = tx.lock().send((fence, keep)) {
                let (fence, keep) = back.0;
                let _ = fence.wait();
                drop(keep);
            }
        }
        // No thread could be made: wait here rather than let go early.
        None => {
            let _ = fence.wait();
            drop(keep);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::super::{Completion, DeviceError};
    use super::*;

    #[derive(Debug, Default)]
    struct Gate(parking_lot::Mutex<bool>, parking_lot::Condvar);

    impl Completion for Gate {
        fn wait(&self) -> Result<(), DeviceError> {
            let mut open = self.0.lock();
            while !*open {
                self.1.wait(&mut open);
            }
            Ok(())
        }
        fn is_done(&self) -> bool {
            *self.0.lock()
        }
    }

    struct Flag(Arc<AtomicBool>, std::sync::mpsc::Sender<()>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
            let _ = self.1.send(());
        }
    }

    #[test]
    fn holds_are_dropped_only_after_their_fence() {
        let gate = Arc::new(Gate::default());
        let dropped = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        after(Fence::new(gate.clone()), Box::new(Flag(dropped.clone(), tx)));
        assert!(rx.recv_timeout(std::time::Duration::from_millis(50)).is_err());
        assert!(
            !dropped.load(Ordering::SeqCst),
            "dropped before the fence completed"
        );
        *gate.0.lock() = true;
        gate.1.notify_all();
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("dropped after the fence");
        assert!(dropped.load(Ordering::SeqCst));

        let (tx, rx) = std::sync::mpsc::channel();
        let now = Arc::new(AtomicBool::new(false));
        after(Fence::done(), Box::new(Flag(now.clone(), tx)));
        assert!(now.load(Ordering::SeqCst), "a completed fence drops at once");
        assert!(rx.try_recv().is_ok());
    }
}
