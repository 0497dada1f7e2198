//! The in-process backend: ranks are threads, links are channels. For unit tests of code that
//! runs collectives, and for the collectives' own tests (the algorithms are those of TCP).

use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use super::group::{Event, Frame, Group, Incoming, Link, LinkError};
use super::{CollectiveOptions, HostCollective};

/// Builds the communicators of an in-process group; hand one to each thread.
pub struct LocalGroup;

impl LocalGroup {
    /// A group of `world` ranks (element `i` is rank `i`) with the default timeouts.
    // Not `Self`: the group is nothing but its members' communicators.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize) -> Vec<HostCollective> {
        Self::with_options(world, &CollectiveOptions::default())
    }

    /// A group of `world` ranks with the given timeouts (`setup_timeout` is not used: an
    /// in-process group is formed at once).
    pub fn with_options(world: usize, options: &CollectiveOptions) -> Vec<HostCollective> {
        let timeout = options.clamped().timeout;
        let (senders, inboxes): (Vec<Sender<Event>>, Vec<Receiver<Event>>) =
            (0..world).map(|_| mpsc::channel()).unzip();
        inboxes
            .into_iter()
            .enumerate()
            .map(|(rank, inbox)| {
                // Each rank holds a sender to its own inbox too, so the inbox never reports
                // "disconnected" (which would make a wait spin instead of sleep).
                let link = ChannelLink { rank, peers: senders.clone(), inbox };
                let (group, bytes_sent) = Group::new(rank, world, timeout, Box::new(link));
                HostCollective::new(group, bytes_sent)
            })
            .collect()
    }
}

struct ChannelLink {
    rank: usize,
    peers: Vec<Sender<Event>>,
    inbox: Receiver<Event>,
}

impl Link for ChannelLink {
    fn send(&mut self, to: usize, frame: &Frame) -> Result<(), LinkError> {
        let event = Event { from: self.rank, what: Incoming::Frame(frame.clone()) };
        self.peers[to].send(event).map_err(|_| LinkError::Closed("its communicator was dropped".into()))
    }

    fn next_event(&mut self, wait: Duration) -> Option<Event> {
        // Disconnected cannot happen (the link holds a sender to its own inbox).
        self.inbox.recv_timeout(wait).ok()
    }

    fn close(&mut self, last: &Frame) {
        let me = self.rank;
        for to in (0..self.peers.len()).filter(|&to| to != me) {
            // A peer already gone cannot be told; that is fine.
            let _ = self.send(to, last);
        }
    }
}
