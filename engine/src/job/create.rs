//! `blockdev-create` as a job, as QEMU runs it: a `file` target creates (or truncates) a
//! regular file; a `qcow2` target formats an existing node (typically a file node added just
//! before) as a qcow2 image. The job is of type `create`, is not a block job (no BLOCK_JOB_*
//! events, not in query-block-jobs), and is dismissed by the user (QEMU creates it with
//! manual dismiss), so its result stays queryable.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use graph::{Error, ErrorKind, Node, Perm, Result};

use super::{Job, JobCx, JobDriver, JobManager, JobSetup, JobSpec, JobType, OnError};
use crate::drivers::qcow2::create::CreateOptions;
use crate::engine::lookup;

/// What to create.
#[derive(Debug, Clone)]
pub enum CreateTarget {
    /// A regular file of `size` bytes (QEMU's BlockdevCreateOptionsFile).
    File {
        /// Its path.
        filename: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A qcow2 image on an existing node (QEMU's BlockdevCreateOptionsQcow2).
    Qcow2 {
        /// The node to format (by node name).
        file: String,
        /// The image's options.
        opts: CreateOptions,
    },
}

/// `blockdev-create`'s arguments.
#[derive(Debug, Clone)]
pub struct CreateArgs {
    /// The job's id (required).
    pub job_id: String,
    /// What to create.
    pub target: CreateTarget,
}

struct CreateJob {
    target: CreateTarget,
    /// The node a qcow2 target formats, or why the job fails (QEMU opens it, and checks the
    /// options, in the job: the command itself succeeds).
    file: Option<Result<Arc<Node>>>,
}

impl JobDriver for CreateJob {
    fn kind(&self) -> JobType {
        JobType::Create
    }

    fn run<'a>(&'a mut self, cx: &'a JobCx) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>> {
        Box::pin(async move {
            cx.set_total(1);
            let r = match &self.target {
                CreateTarget::File { filename, size } => {
                    crate::drivers::file::create_file(filename, *size)
                }
                CreateTarget::Qcow2 { opts, .. } => match self.file.take() {
                    Some(Ok(file)) => crate::drivers::qcow2::create::create(&file, opts).await,
                    Some(Err(e)) => Err(e),
                    None => unreachable!("a qcow2 target is set up with its node"),
                },
            };
            // Done, failed or not (QEMU's blockdev_create_run counts the step either way).
            cx.progress(1);
            r
        })
    }
}

/// The node a qcow2 target formats, checked in QEMU's order (`qcow2_co_create`): it must
/// exist ("Cannot find device='x' nor node-name='x'"), the options must be valid, and it must
/// be writable (and no job may own it).
fn qcow2_target(mgr: &JobManager, file: &str, opts: &CreateOptions) -> Result<Arc<Node>> {
    let node = lookup(file)?;
    opts.validate()?;
    if node.is_read_only() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "Block node is read-only",
        ));
    }
    mgr.check_free(&node)?;
    Ok(node)
}

/// Starts a create job. As in QEMU, the command only creates the job: what the target names
/// is checked by the job, which fails (concluded, with the error in its info) if the node to
/// format does not exist, the options are invalid or the node is read-only.
pub(crate) fn start(
    mgr: &JobManager,
    io: iothreads::IoThreadHandle,
    args: CreateArgs,
) -> Result<Arc<Job>> {
    let spec = JobSpec {
        id: args.job_id.clone(),
        device: String::new(),
        speed: 0,
        on_error: OnError::Report,
        auto_finalize: true,
        auto_dismiss: false,
    };
    mgr.create(spec, io, move |_ctx, mgr| async move {
        match &args.target {
            CreateTarget::File { .. } => Ok(JobSetup {
                driver: Box::new(CreateJob {
                    target: args.target,
                    file: None,
                }),
                nodes: Vec::new(),
            }),
            CreateTarget::Qcow2 { file, opts } => {
                let target = qcow2_target(&mgr, file, opts);
                // The job holds the node it formats, so no other user may write it meanwhile.
                let nodes = match &target {
                    Ok(node) => vec![(
                        Arc::clone(node),
                        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
                        Perm::ALL,
                    )],
                    Err(_) => Vec::new(),
                };
                Ok(JobSetup {
                    driver: Box::new(CreateJob {
                        target: args.target.clone(),
                        file: Some(target),
                    }),
                    nodes,
                })
            }
        }
    })
}
