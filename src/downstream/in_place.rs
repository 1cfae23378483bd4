//! A client session's wake-ups from its own work, handled in place.
//!
//! A session runs its cluster dispatcher inside its own task (see
//! [`crate::upstream::cluster::dispatch`]): the session hands it a batch, the
//! dispatcher answers the session, both through channels whose wake-up
//! targets this very task. Woken while it runs, a tokio task is put back on
//! the run queue once it returns, and the scheduler may wake an idle worker
//! thread to steal it: a futex call and a context switch or two per command
//! for nothing. [`InPlace`] polls the session with a waker that only notes
//! such a wake-up while the session is being polled, and polls it again at
//! once instead (a few times at most, then it yields as asked). Wake-ups
//! from elsewhere (sockets, upstream connections, the hub) go to the task as
//! before.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// Polls in a row for wake-ups of the session's own before it yields.
const IN_PLACE: usize = 8;

struct Flag {
    /// The task's own waker, from its last poll.
    task: Mutex<Option<Waker>>,
    /// The session is being polled now.
    running: AtomicBool,
    /// Woken since its poll began.
    woken: AtomicBool,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Noted first, then `running` read; the poll clears `running`, then
        // reads `woken`: one of the two sees the other (SeqCst), so a
        // wake-up is either handled in place or passed on, never lost.
        self.woken.store(true, SeqCst);
        if !self.running.load(SeqCst) {
            if let Some(w) = self.task.lock().expect("not poisoned").as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

/// `F`, polled again in place when it woke itself (see the module).
pub(super) struct InPlace<F> {
    inner: Pin<Box<F>>,
    flag: Arc<Flag>,
    waker: Waker,
}

impl<F: Future> InPlace<F> {
    pub(super) fn new(inner: F) -> Self {
        let flag = Arc::new(Flag {
            task: Mutex::new(None),
            running: AtomicBool::new(false),
            woken: AtomicBool::new(false),
        });
        InPlace {
            inner: Box::pin(inner),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for InPlace<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        {
            let mut task = this.flag.task.lock().expect("not poisoned");
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        let mut inner_cx = Context::from_waker(&this.waker);
        for _ in 0..IN_PLACE {
            // Cleared before `running` is set: a wake-up in between is
            // passed on (a spare poll at worst), never lost.
            this.flag.woken.store(false, SeqCst);
            this.flag.running.store(true, SeqCst);
            let polled = this.inner.as_mut().poll(&mut inner_cx);
            this.flag.running.store(false, SeqCst);
            if polled.is_ready() {
                return polled;
            }
            if !this.flag.woken.swap(false, SeqCst) {
                return Poll::Pending;
            }
        }
        // Still waking itself (tokio's budget for one poll spent, say):
        // yield as asked.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future that wakes itself `n` times before it is ready.
    struct SelfWaking(usize);

    impl Future for SelfWaking {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 == 0 {
                return Poll::Ready(());
            }
            self.0 -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    #[test]
    fn wake_ups_of_its_own_are_polled_in_place_then_it_yields() {
        let count = Arc::new(Count(0.into()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(InPlace::new(SelfWaking(3)));
        assert!(f.as_mut().poll(&mut cx).is_ready());
        assert_eq!(count.0.load(SeqCst), 0, "no wake-up reached the task");
        let mut f = std::pin::pin!(InPlace::new(SelfWaking(IN_PLACE + 1)));
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert_eq!(count.0.load(SeqCst), 1, "yielded once, as asked");
        assert!(f.as_mut().poll(&mut cx).is_ready());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wake_ups_from_elsewhere_reach_the_task() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let h = tokio::spawn(InPlace::new(async move { rx.await.unwrap() }));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        tx.send(7).unwrap();
        assert_eq!(h.await.unwrap(), 7);
    }
}
