package com.edgeq.demo

import android.app.Activity
import android.content.Intent
import android.os.Build
import android.os.Bundle
import android.util.Log
import android.view.WindowManager
import org.json.JSONArray
import org.json.JSONObject
import org.tensorflow.lite.DataType
import org.tensorflow.lite.Delegate
import org.tensorflow.lite.Interpreter
import org.tensorflow.lite.TensorFlowLite
import org.tensorflow.lite.gpu.CompatibilityList
import org.tensorflow.lite.gpu.GpuDelegate
import org.tensorflow.lite.nnapi.NnApiDelegate
import java.io.File
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.channels.FileChannel
import java.security.MessageDigest
import kotlin.math.min
import kotlin.math.sqrt
import kotlin.random.Random

private const val TAG = "EDGEQ"
private const val SCHEMA = "edgeq.bench/1"

/** What edgeq asks for, from intent extras (defaults match device_bench.py). */
data class Config(
    val model: String?, // file path; null = assets/model.tflite
    val delegate: String,
    val threads: Int,
    val warmup: Int,
    val runs: Int,
    val out: String,
    val seed: Int,
) {
    companion object {
        const val EXTRA_MODEL = "model"
        const val EXTRA_DELEGATE = "delegate"
        const val EXTRA_THREADS = "threads"
        const val EXTRA_WARMUP = "warmup"
        const val EXTRA_RUNS = "runs"
        const val EXTRA_OUT = "out"

        fun fromIntent(intent: Intent) = Config(
            model = intent.getStringExtra(EXTRA_MODEL),
            delegate = intent.getStringExtra(EXTRA_DELEGATE) ?: "xnnpack",
            threads = intent.getIntExtra(EXTRA_THREADS, 1),
            warmup = intent.getIntExtra(EXTRA_WARMUP, 5),
            runs = intent.getIntExtra(EXTRA_RUNS, 50),
            out = intent.getStringExtra(EXTRA_OUT) ?: "result.json",
            seed = intent.getIntExtra("seed", 0),
        )
    }
}

/**
 * Runs one benchmark as the intent says, writes edgeq.bench/1 JSON to the app's files directory
 * (and logcat, tag EDGEQ, prefix EDGEQ_RESULT), then finishes. Started by `edgeq profile
 * --mode app`; see README.md.
 */
class MainActivity : Activity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        window.addFlags(WindowManager.LayoutParams.FLAG_KEEP_SCREEN_ON) // a dimmed screen throttles
        val cfg = Config.fromIntent(intent)
        Thread {
            val json = try {
                runBenchmark(cfg)
            } catch (e: Throwable) {
                // Still write a result, so edgeq reports the cause instead of timing out.
                JSONObject().put("schema", SCHEMA).put("error", "${e.javaClass.simpleName}: ${e.message}")
                    .put("kind", "invoke")
            }
            writeResult(cfg.out, json)
            runOnUiThread { finish() }
        }.start()
    }

    private fun loadModel(cfg: Config): ByteBuffer {
        if (cfg.model != null) {
            FileInputStream(cfg.model).use { s ->
                return s.channel.map(FileChannel.MapMode.READ_ONLY, 0, s.channel.size())
            }
        }
        val fd = assets.openFd("model.tflite")
        FileInputStream(fd.fileDescriptor).use { s ->
            return s.channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
        }
    }

    private fun runBenchmark(cfg: Config): JSONObject {
        val rssStart = rssMb()
        val model = loadModel(cfg)
        val modelSha = sha256(listOf(model))

        val t0 = System.nanoTime()
        val options = Interpreter.Options().setNumThreads(cfg.threads)
        var delegate: Delegate? = null
        when (cfg.delegate) {
            "gpu" -> {
                // Refuse instead of silently running on the CPU: that is what edgeq checks for.
                require(CompatibilityList().isDelegateSupportedOnThisDevice) {
                    "GPU delegate is not supported on this device"
                }
                delegate = GpuDelegate()
            }
            "nnapi" -> delegate = NnApiDelegate()
            "xnnpack" -> options.setUseXNNPACK(true)
            "none", "cpu" -> options.setUseXNNPACK(false)
            else -> throw IllegalArgumentException("unknown delegate ${cfg.delegate}; use gpu, nnapi, xnnpack or none")
        }
        delegate?.let { options.addDelegate(it) }
        val interpreter = Interpreter(model, options)
        val initMs = (System.nanoTime() - t0) / 1e6
        val rssInit = rssMb()

        try {
            val rng = Random(cfg.seed)
            val inputs = Array<Any>(interpreter.inputTensorCount) { i ->
                val t = interpreter.getInputTensor(i)
                val buf = ByteBuffer.allocateDirect(t.numBytes()).order(ByteOrder.nativeOrder())
                when (t.dataType()) {
                    DataType.FLOAT32 -> while (buf.remaining() >= 4) buf.putFloat(rng.nextFloat())
                    else -> while (buf.hasRemaining()) buf.put(rng.nextInt(256).toByte())
                }
                buf
            }
            val outputs = HashMap<Int, Any>()
            for (i in 0 until interpreter.outputTensorCount) {
                outputs[i] = ByteBuffer.allocateDirect(interpreter.getOutputTensor(i).numBytes())
                    .order(ByteOrder.nativeOrder())
            }

            fun once(): Double {
                inputs.forEach { (it as ByteBuffer).rewind() }
                outputs.values.forEach { (it as ByteBuffer).clear() }
                val s = System.nanoTime()
                interpreter.runForMultipleInputsOutputs(inputs, outputs)
                return (System.nanoTime() - s) / 1e6
            }

            val firstMs = once()
            val warm = List(cfg.warmup) { once() }
            val timed = List(cfg.runs) { once() }
            val rssEnd = rssMb()

            val inputInfo = JSONArray()
            for (i in 0 until interpreter.inputTensorCount) {
                val t = interpreter.getInputTensor(i)
                inputInfo.put(JSONObject().put("name", t.name()).put("shape", JSONArray(t.shape().toList()))
                    .put("dtype", t.dataType().name.lowercase()))
            }
            return JSONObject()
                .put("schema", SCHEMA)
                .put("runner", "android_demo")
                .put("model", cfg.model?.let { File(it).name } ?: "model.tflite")
                .put("model_sha256", modelSha)
                .put("model_bytes", model.capacity())
                .put("runtime", JSONObject().put("name", "litert-android").put("version", TensorFlowLite.runtimeVersion()))
                .put("threads", cfg.threads)
                .put("delegate", cfg.delegate)
                .put("init_ms", initMs)
                .put("first_inference_ms", firstMs)
                .put("warmup", JSONObject().put("count", warm.size).put("avg_ms", if (warm.isEmpty()) JSONObject.NULL else warm.average()))
                .put("runs", summarize(timed))
                .put("timings_ms", JSONArray(timed))
                .put("memory_mb", JSONObject().put("init_delta", rssInit.first - rssStart.first)
                    .put("overall_delta", rssEnd.first - rssStart.first).put("peak_rss", rssEnd.second))
                .put("inputs", inputInfo)
                .put("input_source", "random")
                .put("outputs_sha256", sha256(outputs.toSortedMap().values.map { it as ByteBuffer }))
                .put("device", JSONObject()
                    .put("model", Build.MODEL)
                    .put("manufacturer", Build.MANUFACTURER)
                    .put("android_release", Build.VERSION.RELEASE)
                    .put("sdk_int", Build.VERSION.SDK_INT)
                    .put("abi", Build.SUPPORTED_ABIS.firstOrNull() ?: "")
                    .put("machine", Build.SUPPORTED_ABIS.firstOrNull() ?: "")
                    .put("system", "Android"))
        } finally {
            interpreter.close()
            (delegate as? AutoCloseable)?.close()
        }
    }

    /** Temp file + rename: edgeq polls for the file, and must never read half of it. */
    private fun writeResult(name: String, json: JSONObject) {
        val dir = getExternalFilesDir(null) ?: filesDir
        val tmp = File(dir, "$name.tmp")
        tmp.writeText(json.toString())
        tmp.renameTo(File(dir, name))
        Log.i(TAG, "EDGEQ_RESULT $json")
    }
}

/** count/min/max/mean/std/p5/median/p95 exactly as edgeq's device_bench.py computes them. */
fun summarize(times: List<Double>): JSONObject {
    if (times.isEmpty()) return JSONObject().put("count", 0)
    val s = times.sorted()
    val mean = s.average()
    val std = sqrt(s.sumOf { (it - mean) * (it - mean) } / s.size) // population std, like benchmark_model
    fun pct(q: Double): Double {
        val k = (s.size - 1) * q / 100.0
        val lo = k.toInt()
        val hi = min(lo + 1, s.size - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)
    }
    return JSONObject().put("count", s.size).put("min_ms", s.first()).put("max_ms", s.last())
        .put("mean_ms", mean).put("std_ms", std).put("p5_ms", pct(5.0)).put("median_ms", pct(50.0))
        .put("p95_ms", pct(95.0))
}

/** (current RSS, peak RSS) in MB from /proc/self/status, as device_bench.py reads them. */
fun rssMb(): Pair<Double, Double> {
    var cur = 0.0
    var peak = 0.0
    File("/proc/self/status").forEachLine { line ->
        val kb = line.split(Regex("\\s+")).getOrNull(1)?.toDoubleOrNull() ?: return@forEachLine
        if (line.startsWith("VmRSS:")) cur = kb / 1024.0
        if (line.startsWith("VmHWM:")) peak = kb / 1024.0
    }
    return Pair(cur, peak)
}

fun sha256(buffers: List<ByteBuffer>): String {
    val md = MessageDigest.getInstance("SHA-256")
    buffers.forEach { md.update(it.duplicate().apply { rewind() }) }
    return md.digest().joinToString("") { "%02x".format(it) }
}
