//! A bounded write-behind queue that never makes the producer wait: when a
//! new item would overflow it (in items or in bytes), the OLDEST pending
//! items are dropped to make room, and counted. Consumers wait for items
//! asynchronously.
//!
//! It owns only the queue; it must never know what the items are, and never
//! drop an item while holding its lock (an item may release other locks
//! when dropped: an L1 read guard takes the L1 lock).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

struct State<T> {
    items: VecDeque<(T, u64)>,
    bytes: u64,
    closed: bool,
}

/// The queue. Share it behind an `Arc`.
pub struct DropOldestQueue<T> {
    state: Mutex<State<T>>,
    ready: Notify,
    max_items: usize,
    max_bytes: u64,
    dropped: AtomicU64,
}

impl<T> DropOldestQueue<T> {
    /// At most `max_items` items and `max_bytes` bytes pending (both at
    /// least one item's worth).
    pub fn new(max_items: usize, max_bytes: u64) -> Self {
        DropOldestQueue {
            state: Mutex::new(State { items: VecDeque::new(), bytes: 0, closed: false }),
            ready: Notify::new(),
            max_items: max_items.max(1),
            max_bytes: max_bytes.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues `item` of `bytes`, dropping the oldest pending items until it
    /// fits. An item larger than the whole queue is dropped itself. Returns
    /// whether `item` was queued. Never waits.
    pub fn push(&self, item: T, bytes: u64) -> bool {
        if bytes > self.max_bytes {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut evicted = Vec::new();
        let accepted = {
            let mut s = self.state.lock();
            if s.closed {
                false
            } else {
                while s.items.len() >= self.max_items || s.bytes + bytes > self.max_bytes {
                    let Some((old, b)) = s.items.pop_front() else { break };
                    s.bytes -= b;
                    evicted.push(old);
                }
                s.items.push_back((item, bytes));
                s.bytes += bytes;
                true
            }
        };
        self.dropped.fetch_add(evicted.len() as u64, Ordering::Relaxed);
        drop(evicted);
        if accepted {
            self.ready.notify_one();
        }
        accepted
    }

    /// Puts back an item popped but not done (its consumer could not finish
    /// it now) as the next to pop, if it fits without dropping anything;
    /// else drops it, counted. Returns whether it was put back.
    pub fn put_back(&self, item: T, bytes: u64) -> bool {
        let refused = {
            let mut s = self.state.lock();
            if s.closed || s.items.len() >= self.max_items || s.bytes + bytes > self.max_bytes {
                Some(item)
            } else {
                s.items.push_front((item, bytes));
                s.bytes += bytes;
                None
            }
        };
        match refused {
            Some(item) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                drop(item);
                false
            }
            None => {
                self.ready.notify_one();
                true
            }
        }
    }

    /// The oldest pending item, waiting for one; `None` once closed and empty.
    pub async fn pop(&self) -> Option<T> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.state.lock();
                if let Some((item, bytes)) = s.items.pop_front() {
                    s.bytes -= bytes;
                    // Wake another consumer if more is pending.
                    if !s.items.is_empty() {
                        self.ready.notify_one();
                    }
                    return Some(item);
                }
                if s.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Refuses new items and wakes every consumer; pending items are still
    /// popped.
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_waiters();
    }

    /// Items and bytes pending.
    pub fn depth(&self) -> (u64, u64) {
        let s = self.state.lock();
        (s.items.len() as u64, s.bytes)
    }

    /// Items dropped so far (the oldest ones, to make room, or too big).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_it() {
        let q = DropOldestQueue::new(3, 1 << 20);
        for i in 0..5 {
            assert!(q.push(i, 1));
        }
        assert_eq!(q.dropped(), 2);
        assert_eq!(q.depth(), (3, 3));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let got: Vec<i32> = rt.block_on(async { vec![q.pop().await.unwrap(), q.pop().await.unwrap()] });
        assert_eq!(got, vec![2, 3], "the newest survive, oldest first");
    }

    #[test]
    fn the_byte_bound_drops_as_many_old_items_as_needed() {
        let q = DropOldestQueue::new(100, 10);
        q.push("a", 4);
        q.push("b", 4);
        q.push("c", 8);
        assert_eq!(q.dropped(), 2);
        assert_eq!(q.depth(), (1, 8));
        assert!(!q.push("huge", 11), "bigger than the whole queue");
        assert_eq!(q.dropped(), 3);
        assert_eq!(q.depth(), (1, 8), "and nothing else was dropped for it");
    }

    #[test]
    fn an_item_put_back_is_next_unless_the_queue_filled_meanwhile() {
        let q = DropOldestQueue::new(2, 1 << 20);
        q.push(1, 1);
        assert!(q.put_back(0, 1));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(rt.block_on(q.pop()), Some(0));
        q.push(2, 1);
        assert!(!q.put_back(0, 1), "full: the put-back item is the one dropped");
        assert_eq!(q.dropped(), 1);
        assert_eq!(q.depth(), (2, 2));
    }

    #[test]
    fn consumers_wait_for_items_and_end_when_closed() {
        let q = Arc::new(DropOldestQueue::new(8, 1 << 20));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let consumer = rt.spawn({
            let q = q.clone();
            async move {
                let mut got = Vec::new();
                while let Some(i) = q.pop().await {
                    got.push(i);
                }
                got
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        q.push(1, 1);
        q.push(2, 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        q.close();
        assert!(!q.push(3, 1), "closed");
        assert_eq!(rt.block_on(consumer).unwrap(), vec![1, 2]);
    }
}
