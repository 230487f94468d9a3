//! A client newer than its agent (engines upgraded before the agent DaemonSet, or the agent
//! rolled back since): the agent refuses a hello of a version it does not know, the client greets
//! it again one version lower, and its calls are what that version has (a hold is a lookup that
//! holds nothing before version 5, and carries no ticket before version 6), also where the agent
//! restarted older between a call's choice and its sending.

use std::io::{IoSlice, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::time::Duration;

use kvstore::client::{Client, ClientConfig, ClientError};
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
    /// A pull, and whether it named a ticket.
    Pull {
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
        welcome(&stream, header.id, version, &arena);
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
                Request::Pull(_, _, hashes, ticket) if version >= 3 => {
                    let ticket = ticket.is_some();
                    seen.send(Seen::Pull { ticket }).expect("the test listens");
                    Response::Pull(vec![true; hashes.len()])
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

/// Welcomes a client's hello `id` in `version`, passing the arena.
fn welcome(stream: &UnixStream, id: u32, version: u16, arena: &HostArena) {
    let mut out = Vec::new();
    Response::Welcome(Welcome {
        version,
        arena_len: arena.len(),
        max_block_len: 1 << 20,
        instance: 7,
    })
    .encode(id, &mut out);
    send_with_fd(stream, &out, arena);
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

/// Serves a client's first connection as an agent of this version that restarts, older, after
/// the first call it is sent (unanswered); then the connections of an agent that speaks
/// versions up to `newest`.
fn agent_rolled_back(listener: UnixListener, newest: u16, seen: mpsc::Sender<Seen>) {
    let arena = HostArena::create("rolled-back-agent", 1 << 20, HugePages::Off).expect("an arena");
    let (stream, _) = listener.accept().expect("a connection");
    let mut body = Vec::new();
    wire::read_frame(&mut &stream, &mut body).expect("a hello");
    let (header, Request::Hello { version, .. }) = Request::decode(&body).expect("a request") else {
        panic!("expected a hello");
    };
    seen.send(Seen::Hello(version)).expect("the test listens");
    welcome(&stream, header.id, version, &arena);
    wire::read_frame(&mut &stream, &mut body).expect("a call");
    let (_, req) = Request::decode(&body).expect("a request");
    let call = match req {
        Request::Pull(.., ticket) => Seen::Pull {
            ticket: ticket.is_some(),
        },
        other => Seen::Call(other.verb()),
    };
    seen.send(call).expect("the test listens");
    drop(stream);
    older_agent(listener, newest, seen);
}

/// Runs `calls` with a client of an agent that speaks versions up to `newest`; what the agent
/// saw.
fn with_older_agent(newest: u16, calls: impl FnOnce(&Client, &Namespace, &[BlockHash])) -> Vec<Seen> {
    with_agent(move |listener, tx| older_agent(listener, newest, tx), calls)
}

/// Runs `calls` with a client of the agent that `serve` plays on a socket; what it saw.
fn with_agent(
    serve: impl FnOnce(UnixListener, mpsc::Sender<Seen>) + Send + 'static,
    calls: impl FnOnce(&Client, &Namespace, &[BlockHash]),
) -> Vec<Seen> {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("older.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (tx, seen) = mpsc::channel();
    let agent = std::thread::spawn(move || serve(listener, tx));
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

/// An agent rolled back to protocol 5 while a pull under a ticket was on its way (the client
/// chose the request by the connection it had): the client reconnects and pulls again, without
/// the ticket the older agent would take for a malformed frame.
#[test]
fn a_call_after_the_agent_rolled_back_is_sent_in_the_older_version() {
    let seen = with_agent(
        |listener, tx| agent_rolled_back(listener, 5, tx),
        |client, ns, hashes| {
            let pulled = client.pull_under("peer:1", ns, hashes, HoldTicket::new(9));
            assert_eq!(pulled.expect("pulled after the reconnection"), [true; 3]);
        },
    );
    assert_eq!(
        seen,
        [
            Seen::Hello(PROTOCOL_VERSION),
            Seen::Pull { ticket: true },
            Seen::Hello(PROTOCOL_VERSION),
            Seen::Hello(5),
            Seen::Pull { ticket: false }
        ]
    );
}

/// An agent rolled back to protocol 1, which has no announce, while an announce was on its
/// way: the client reconnects and, as with any agent of protocol 1, announces nothing.
#[test]
fn an_announce_after_the_agent_rolled_back_before_announces_is_skipped() {
    let seen = with_agent(
        |listener, tx| agent_rolled_back(listener, 1, tx),
        |client, ns, _| client.announce(ns, "m").expect("nothing to announce"),
    );
    let mut expected = vec![Seen::Hello(PROTOCOL_VERSION), Seen::Call("announce")];
    expected.extend((1..=PROTOCOL_VERSION).rev().map(Seen::Hello));
    assert_eq!(seen, expected);
}

/// An agent of protocol 2 has no pull: a pull of blocks fails naming the version it needs and
/// sends nothing, and a pull that would only end a ticket's holds has nothing to end there.
#[test]
fn a_pull_from_an_agent_before_pulls_says_which_version_it_needs() {
    let seen = with_older_agent(2, |client, ns, hashes| {
        let err = client
            .pull("peer:1", ns, hashes)
            .expect_err("no pull in protocol 2");
        assert!(
            matches!(
                err,
                ClientError::Unsupported {
                    verb: "pull",
                    version: 2,
                    since: 3
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "the agent speaks protocol 2, which has no pull (3 or later needed)"
        );
        let ended = client.pull_under("peer:1", ns, &[], HoldTicket::new(4));
        assert_eq!(ended.expect("nothing to end"), Vec::<bool>::new());
        assert_eq!(
            client.pull("peer:1", ns, &[]).expect("nothing to pull"),
            Vec::<bool>::new()
        );
    });
    let hellos: Vec<Seen> = (2..=PROTOCOL_VERSION).rev().map(Seen::Hello).collect();
    assert_eq!(seen, hellos);
}
