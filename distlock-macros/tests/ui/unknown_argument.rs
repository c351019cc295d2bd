#[distlock::locked("payment:{order}")]
async fn pay(order_id: u64) -> Result<u64, distlock::LockError> {
    Ok(order_id)
}

fn main() {}
