//! A `kvcoord serve` child process on a private socket, for `demo` and
//! `bench`. It must never outlive its owner: dropping it SIGKILLs it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The coordinator child process.
pub struct Server {
    child: Child,
}

impl Server {
    pub fn start(socket: &Path, log: &Path, args: &[&str]) -> std::io::Result<Server> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new(std::env::current_exe()?)
            .args(["serve", "--socket"])
            .arg(socket)
            .args(args)
            .args(if args.contains(&"--admin") { &[][..] } else { &["--admin", "off"][..] })
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Server { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn wait_listening(socket: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}
