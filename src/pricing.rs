//! Prices, in one place. Everything is exact integer msat: a chunk costs its tokens ×
//! `msat_per_token`, so the last (short) chunk of a generation costs less.

/// The price list of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub msat_per_token: u64,
    pub msat_per_prompt_token: u64,
    pub chunk_tokens: u32,
}

impl Price {
    pub fn from_model(m: &crate::config::ModelConfig) -> Price {
        Price {
            msat_per_token: m.msat_per_token,
            msat_per_prompt_token: m.msat_per_prompt_token,
            chunk_tokens: m.chunk_tokens,
        }
    }

    /// Price of a chunk of `tokens` output tokens.
    pub fn chunk(&self, tokens: u32) -> u64 {
        tokens as u64 * self.msat_per_token
    }

    pub fn full_chunk(&self) -> u64 {
        self.chunk(self.chunk_tokens)
    }

    pub fn prompt(&self, prompt_tokens: u32) -> u64 {
        prompt_tokens as u64 * self.msat_per_prompt_token
    }

    /// A session's first payment: its prompt's price, or (a free prompt) its first chunk's.
    pub fn first_payment(&self, prompt_tokens: u32, max_tokens: u32) -> u64 {
        match self.prompt(prompt_tokens) {
            0 => self.chunk(self.chunk_tokens.min(max_tokens)),
            p => p,
        }
    }

    /// Most a generation can cost: the prompt and all `max_tokens`.
    pub fn max_cost(&self, prompt_tokens: u32, max_tokens: u32) -> u64 {
        self.prompt(prompt_tokens) + self.chunk(max_tokens)
    }

    /// Chunks needed for `tokens` output tokens.
    pub fn chunks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.chunk_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_prices() {
        let p = Price {
            msat_per_token: 1_000,
            msat_per_prompt_token: 10,
            chunk_tokens: 16,
        };
        assert_eq!(p.full_chunk(), 16_000);
        assert_eq!(p.chunk(5), 5_000, "a short last chunk costs less");
        assert_eq!(p.max_cost(42, 100), 420 + 100_000);
        assert_eq!(p.chunks_for(100), 7);
        assert_eq!(p.chunks_for(96), 6);
    }
}
