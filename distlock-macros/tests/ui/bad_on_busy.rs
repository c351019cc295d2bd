#[distlock::locked("job", on_busy = wait)]
async fn job() -> Result<(), distlock::LockError> {
    Ok(())
}

fn main() {}
