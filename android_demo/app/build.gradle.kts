plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "com.edgeq.demo"
    compileSdk = 34

    defaultConfig {
        applicationId = "com.edgeq.demo" // edgeq's runner starts com.edgeq.demo/.MainActivity
        // LiteRT 1.4.0's native library needs strtod_l (API 26): on Android 7.x it fails to load
        // (google-ai-edge/LiteRT#3274), so such phones refuse the install instead.
        minSdk = 26
        targetSdk = 34
        versionCode = 1
        versionName = "0.1.0"
    }
    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    // A model bundled in assets must stay uncompressed so it can be memory-mapped.
    androidResources {
        noCompress += "tflite"
    }
}

dependencies {
    // LiteRT (formerly TensorFlow Lite) Interpreter API: the same interpreter benchmark_model
    // runs, so app and benchmark_model numbers are comparable. litert-gpu adds the GPU delegate.
    // MainActivity also compiles against classes that live in the API artifacts (DataType,
    // Delegate, Tensor, TensorFlowLite, NnApiDelegate in litert-api; the GPU delegate's API in
    // litert-gpu-api), so they are declared, and pinned with strictly(): litert's POM asks for
    // litert-api [1.4.0], a requirement Gradle's conflict resolution still raises when another
    // library wants a newer one, and the runtime only works with its own API version (a user
    // reports InterpreterFactoryImpl errors with litert 1.4.0 and no litert-api declared:
    // google-ai-edge/LiteRT#2752; LiteRT's publishing script pairs them at exactly one version).
    val litert = "1.4.0"
    implementation("com.google.ai.edge.litert:litert:$litert")
    implementation("com.google.ai.edge.litert:litert-api") { version { strictly(litert) } }
    implementation("com.google.ai.edge.litert:litert-gpu:$litert")
    implementation("com.google.ai.edge.litert:litert-gpu-api") { version { strictly(litert) } }
}
