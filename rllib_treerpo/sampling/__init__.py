"""Growing trees and evaluating a policy: the sampler, prompts, detokenization, held-out evaluation."""
