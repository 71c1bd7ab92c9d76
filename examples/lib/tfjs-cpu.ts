/**
 * TensorFlow.js on its pure-JS `cpu` backend (tfjs-node is not used), with every op's
 * gradient registered (`model.fit` and `optimizer.minimize` both need them) and tfjs's
 * "install tfjs-node" notice silenced.
 */
import '@tensorflow/tfjs-backend-cpu'
import '@tensorflow/tfjs-core/dist/register_all_gradients'
import * as tf from '@tensorflow/tfjs-core'

export async function useCpuBackend(): Promise<void> {
  tf.env().set('PROD', true)
  if (!(await tf.setBackend('cpu'))) throw new Error('the tfjs cpu backend did not start')
}
