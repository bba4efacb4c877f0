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
    file: Option<Arc<Node>>,
}

impl JobDriver for CreateJob {
    fn kind(&self) -> JobType {
        JobType::Create
    }

    fn run<'a>(&'a mut self, cx: &'a JobCx) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>> {
        Box::pin(async move {
            cx.set_total(1);
            match &self.target {
                CreateTarget::File { filename, size } => {
                    crate::drivers::file::create_file(filename, *size)?;
                }
                CreateTarget::Qcow2 { opts, .. } => {
                    let file = self.file.as_ref().expect("set up with the node");
                    crate::drivers::qcow2::create::create(file, opts).await?;
                }
            }
            cx.progress(1);
            Ok(())
        })
    }
}

/// Starts a create job.
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
                opts.validate()?;
                let node = lookup(file)?;
                mgr.check_free(&node)?;
                if node.is_read_only() {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!("Node '{file}' is read-only"),
                    ));
                }
                Ok(JobSetup {
                    driver: Box::new(CreateJob {
                        target: args.target.clone(),
                        file: Some(Arc::clone(&node)),
                    }),
                    nodes: vec![(
                        node,
                        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
                        Perm::ALL,
                    )],
                })
            }
        }
    })
}
