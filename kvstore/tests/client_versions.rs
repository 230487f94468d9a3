//! A client newer than its agent (engines upgraded before the agent DaemonSet): the agent refuses
//! a hello of a version it does not know, the client greets it again one version lower, and its
//! calls are what that version has (a hold is a lookup that holds nothing before version 5, and
//! carries no ticket before version 6).

use std::io::{IoSlice, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::time::Duration;

use kvstore::client::{Client, ClientConfig};
use kvstore::transport::HoldTicket;
use kvstore::wire::{self, ErrorCode, PROTOCOL_VERSION, Request, Response, Welcome};
use kvstore::{BlockHash, HostArena, HugePages, Namespace, TierLevel};

/// What the older agent saw: each hello's version, and the verbs of the calls after it.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Hello(u16),
    Call(&'static str),
    /// A hold, and whether it named a ticket.
    Hold {
        ticket: bool,
    },
}

/// Serves the connections of one client as an agent that speaks versions up to `newest` (one
/// refused hello per newer version, then the connection it welcomes): a lookup finds every
/// block in the arena, a hold holds every block (from version 5), any other call is refused.
fn older_agent(listener: UnixListener, newest: u16, seen: mpsc::Sender<Seen>) {
    let arena = HostArena::create("older-agent", 1 << 20, HugePages::Off).expect("an arena");
    let connections = usize::from(PROTOCOL_VERSION - newest) + 1;
    for stream in listener.incoming().take(connections) {
        let stream = stream.expect("a connection");
        let mut body = Vec::new();
        wire::read_frame(&mut &stream, &mut body).expect("a hello");
        let (header, Request::Hello { version, .. }) = Request::decode(&body).expect("a request") else {
            panic!("expected a hello");
        };
        seen.send(Seen::Hello(version)).expect("the test listens");
        let mut out = Vec::new();
        if version > newest {
            Response::Error {
                code: ErrorCode::UnsupportedVersion,
                message: format!("protocol version {version} is not supported"),
            }
            .encode(header.id, &mut out);
            (&stream).write_all(&out).expect("the refusal");
            continue;
        }
        Response::Welcome(Welcome {
            version,
            arena_len: arena.len(),
            max_block_len: 1 << 20,
            instance: 7,
        })
        .encode(header.id, &mut out);
        send_with_fd(&stream, &out, &arena);
        while wire::read_frame(&mut &stream, &mut body).is_ok() {
            let (header, req) = Request::decode(&body).expect("a request");
            let resp = match req {
                Request::Lookup(_, hashes) => {
                    seen.send(Seen::Call("lookup")).expect("the test listens");
                    Response::Lookup(vec![TierLevel::Host; hashes.len()])
                }
                Request::Hold(_, hashes, ticket) if version >= 5 => {
                    let ticket = ticket.is_some();
                    seen.send(Seen::Hold { ticket }).expect("the test listens");
                    Response::Hold {
                        tiers: vec![TierLevel::Host; hashes.len()],
                        held: hashes.len() as u32,
                    }
                }
                other => {
                    seen.send(Seen::Call(other.verb())).expect("the test listens");
                    Response::Error {
                        code: ErrorCode::Malformed,
                        message: "unknown to this agent".into(),
                    }
                }
            };
            out.clear();
            resp.encode(header.id, &mut out);
            (&stream).write_all(&out).expect("an answer");
        }
    }
}

fn send_with_fd(stream: &UnixStream, frame: &[u8], arena: &HostArena) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [arena.fd()];
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    let sent = sendmsg(
        stream.as_fd(),
        &[IoSlice::new(frame)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .expect("the welcome");
    (&*stream).write_all(&frame[sent..]).expect("the welcome's rest");
}

/// Runs `calls` with a client of an agent that speaks versions up to `newest`; what the agent
/// saw.
fn with_older_agent(newest: u16, calls: impl FnOnce(&Client, &Namespace, &[BlockHash])) -> Vec<Seen> {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("older.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (tx, seen) = mpsc::channel();
    let agent = std::thread::spawn(move || older_agent(listener, newest, tx));
    let client = Client::connect(ClientConfig {
        timeout: Duration::from_secs(10),
        ..ClientConfig::new(&socket)
    })
    .expect("connected at a lower version");
    let hashes: Vec<BlockHash> = (0..3).map(BlockHash::from_u64).collect();
    calls(&client, &Namespace::builder("m").build(), &hashes);
    drop(client);
    agent.join().expect("the agent thread");
    seen.try_iter().collect()
}

#[test]
fn a_client_greets_an_older_agent_in_its_version_and_holds_nothing_there() {
    let seen = with_older_agent(4, |client, ns, hashes| {
        let out = client.hold(ns, hashes).expect("a hold");
        assert_eq!((out.tiers, out.held), (vec![TierLevel::Host; 3], 0));
    });
    assert_eq!(
        seen,
        [
            Seen::Hello(PROTOCOL_VERSION),
            Seen::Hello(5),
            Seen::Hello(4),
            Seen::Call("lookup")
        ]
    );
}

/// An agent of protocol 5 holds, without tickets: a hold under one holds as any hold, ending
/// a ticket's holds there ends none, and a pull that only ends a ticket asks nothing.
#[test]
fn a_client_holds_without_tickets_on_an_agent_before_them() {
    let seen = with_older_agent(5, |client, ns, hashes| {
        let ticket = HoldTicket::new(9);
        let out = client.hold_under(ns, hashes, ticket).expect("a hold");
        assert_eq!((out.tiers.len(), out.held), (3, 3));
        let unheld = client.unhold(ns, HoldTicket::new(9).unwrap());
        assert_eq!(unheld.expect("an unhold"), 0);
        let pulled = client.pull_under("peer:1", ns, &[], ticket);
        assert_eq!(pulled.expect("nothing to pull"), Vec::<bool>::new());
    });
    assert_eq!(
        seen,
        [
            Seen::Hello(PROTOCOL_VERSION),
            Seen::Hello(5),
            Seen::Hold { ticket: false }
        ]
    );
}
